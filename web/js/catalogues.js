// The client's catalogues and their SHA-384, written by `python -m broker web-manifest build`
// from i18n/*.json (broker/webmanifest/catalogue_pins.py): do not edit by hand.
export const DEFAULT_LANGUAGE = "en";
export const CATALOGUES = {
  "en": {
    "dir": "ltr",
    "integrity": "sha384-AvFK6y4UxfSqB7uUUWS2PgoS5HtD0OikaXm7Gyj9+ZmYT0tgOMHhqmAfXVyJBulM",
    "name": "English",
    "url": "/static/i18n/en.json"
  },
  "es": {
    "dir": "ltr",
    "integrity": "sha384-T5oSpEu1yD+WF6xcwyn2z6fxhhid3IThI2/mutVGvT4BEbdbKG71fegoTyvT0veg",
    "name": "Español",
    "url": "/static/i18n/es.json"
  }
};
