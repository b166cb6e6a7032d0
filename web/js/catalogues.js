// The client's catalogues and their SHA-384, written by `python -m broker web-manifest build`
// from i18n/*.json (broker/webmanifest/catalogue_pins.py): do not edit by hand.
export const DEFAULT_LANGUAGE = "en";
export const CATALOGUES = {
  "en": {
    "dir": "ltr",
    "integrity": "sha384-WdxgOLe/3Gy1uzn6nVZNInEq2+djWmGmZw0Brr+WGUBse63oXVwfMZu2Cn9ITcuL",
    "name": "English",
    "url": "/static/i18n/en.json"
  },
  "es": {
    "dir": "ltr",
    "integrity": "sha384-m1+XqsEZe1ODLQ87ijVlbdihxZvSfCX1kZXHtK+UiKHRJ3Fnk2+epRRWt3eXJv3L",
    "name": "Español",
    "url": "/static/i18n/es.json"
  }
};
