// The client's catalogues and their SHA-384, written by `python -m broker web-manifest build`
// from i18n/*.json (broker/webmanifest/catalogue_pins.py): do not edit by hand.
export const DEFAULT_LANGUAGE = "en";
export const CATALOGUES = {
  "en": {
    "dir": "ltr",
    "integrity": "sha384-rsVLVPMSesyQCFZi009ROyntUqys6nuZySie5BZLExnhrUuvlwmVyfaRSdveE8PZ",
    "name": "English",
    "url": "/static/i18n/en.json"
  },
  "es": {
    "dir": "ltr",
    "integrity": "sha384-adTpRGv7tvPUuq5jl1EIM5hgFWeoZk2uKlmrJY4Tyaih7bn4cyqWpTuwXcQ2SXqC",
    "name": "Español",
    "url": "/static/i18n/es.json"
  }
};
