// The client's catalogues and their SHA-384, written by `python -m broker web-manifest build`
// from i18n/*.json (broker/webmanifest/catalogue_pins.py): do not edit by hand.
export const DEFAULT_LANGUAGE = "en";
export const CATALOGUES = {
  "en": {
    "dir": "ltr",
    "integrity": "sha384-ggGKEaqG7Eb5SmUlyKsyjgrt7DsUtouwOspbIskLa7nhkiwMx+6WmayogqGnO4Zc",
    "name": "English",
    "url": "/static/i18n/en.json"
  },
  "es": {
    "dir": "ltr",
    "integrity": "sha384-J6yX6IDlsUXS/7vgPh8KMXvukbJPnYj2+SqfwaEsvACoMshx7H4gyekBGCbqrgNz",
    "name": "Español",
    "url": "/static/i18n/es.json"
  }
};
