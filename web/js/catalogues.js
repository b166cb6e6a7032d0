// The client's catalogues and their SHA-384, written by `python -m broker web-manifest build`
// from i18n/*.json (broker/webmanifest/catalogue_pins.py): do not edit by hand.
export const DEFAULT_LANGUAGE = "en";
export const CATALOGUES = {
  "en": {
    "dir": "ltr",
    "integrity": "sha384-RXMwTs7Y8M1M8AopvntL+q/tXLmJkm/1fx0dLkzVWAee8+5hIqdlqTBu8RzhCcCY",
    "name": "English",
    "url": "/static/i18n/en.json"
  },
  "es": {
    "dir": "ltr",
    "integrity": "sha384-EXy99jY069lHxJovwuNwNzIpzLbldHWqbGkTnK7/66OhD6fJJxFfA8MDBOZRNjj9",
    "name": "Español",
    "url": "/static/i18n/es.json"
  }
};
