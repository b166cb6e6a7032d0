// The client's catalogues and their SHA-384, written by `python -m broker web-manifest build`
// from i18n/*.json (broker/webmanifest/catalogue_pins.py): do not edit by hand.
export const DEFAULT_LANGUAGE = "en";
export const CATALOGUES = {
  "en": {
    "dir": "ltr",
    "integrity": "sha384-ayM3FHt/iaoUghNYTBXGvJnYftvL2TUx9kqnArCXmPXyrYfc7r/pHt9aMd/BUTeu",
    "name": "English",
    "url": "/static/i18n/en.json"
  },
  "es": {
    "dir": "ltr",
    "integrity": "sha384-9XmAKJtVpK7MXm+T2GXnGIPLo8fh7TkdBJMgGrS/WBPkmIlKv+JJRpvLfOLmo0+u",
    "name": "Español",
    "url": "/static/i18n/es.json"
  }
};
