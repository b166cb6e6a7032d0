// The client's catalogues and their SHA-384, written by `python -m broker web-manifest build`
// from i18n/*.json (broker/webmanifest/catalogue_pins.py): do not edit by hand.
export const DEFAULT_LANGUAGE = "en";
export const CATALOGUES = {
  "en": {
    "dir": "ltr",
    "integrity": "sha384-izuYpZY1aX5iVt2RPSBUFUqvjBKXKukltyJFjFHDMJlZj/3kCJALDWgPi9jgxvVJ",
    "name": "English",
    "url": "/static/i18n/en.json"
  },
  "es": {
    "dir": "ltr",
    "integrity": "sha384-ka0ABJmgtWCNxbn8g2xMC4b+LcRPeMllWFpdd0iSgo8R6WGnekAVoPM+J3j2DCqu",
    "name": "Español",
    "url": "/static/i18n/es.json"
  }
};
