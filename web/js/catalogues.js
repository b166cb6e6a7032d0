// The client's catalogues and their SHA-384, written by `python -m broker web-manifest build`
// from i18n/*.json (broker/webmanifest/catalogue_pins.py): do not edit by hand.
export const DEFAULT_LANGUAGE = "en";
export const CATALOGUES = {
  "en": {
    "dir": "ltr",
    "integrity": "sha384-mK47y09ZPpswNXk7bgYfjCqFznrMhAZ3uZspfejQOwaRkBN6VI/L7+UiTOIs9nZI",
    "name": "English",
    "url": "/static/i18n/en.json"
  },
  "es": {
    "dir": "ltr",
    "integrity": "sha384-0T9tDuyQcEolBhxAD82co9r5DDHQLBS/rsdPiHnnlWyYAHY4zbh85GYcOjdZqXhX",
    "name": "Español",
    "url": "/static/i18n/es.json"
  }
};
