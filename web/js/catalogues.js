// The client's catalogues and their SHA-384, written by `python -m broker web-manifest build`
// from i18n/*.json (broker/webmanifest/catalogue_pins.py): do not edit by hand.
export const DEFAULT_LANGUAGE = "en";
export const CATALOGUES = {
  "en": {
    "dir": "ltr",
    "integrity": "sha384-4di/iWqUMP/eKBhu8dgUrOdRgmbXr4t+6T2YXvuMBP+V42eiOeZOJwzZLkODE444",
    "name": "English",
    "url": "/static/i18n/en.json"
  },
  "es": {
    "dir": "ltr",
    "integrity": "sha384-5rsxt+ihKHeI2s/XrGaL5dhwazEeeXuR2Wio+hAod3XDzmhpgEu/4c07Hh6wCsir",
    "name": "Español",
    "url": "/static/i18n/es.json"
  }
};
