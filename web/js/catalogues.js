// The client's catalogues and their SHA-384, written by `python -m broker web-manifest build`
// from i18n/*.json (broker/webmanifest/catalogue_pins.py): do not edit by hand.
export const DEFAULT_LANGUAGE = "en";
export const CATALOGUES = {
  "en": {
    "dir": "ltr",
    "integrity": "sha384-F7t4o3MmGlGJwect4Qz+y7oq58zK/2GJ3hMzkXsNKSejD0NcQe9ENPkmmAnXjLXw",
    "name": "English",
    "url": "/static/i18n/en.json"
  },
  "es": {
    "dir": "ltr",
    "integrity": "sha384-sLz6EH31/6nqSzj36R5JQ+9bomXIaOSW0uAuD432DgK+/fOXg4it8HWVAWGTK0+F",
    "name": "Español",
    "url": "/static/i18n/es.json"
  }
};
