// The client's catalogues and their SHA-384, written by `python -m broker web-manifest build`
// from i18n/*.json (broker/webmanifest/catalogue_pins.py): do not edit by hand.
export const DEFAULT_LANGUAGE = "en";
export const CATALOGUES = {
  "en": {
    "dir": "ltr",
    "integrity": "sha384-1blJQeipx42oXSiWgm+OnxROPGuQi4NLoyNh56PQbwNzYUJbd/ETG0eAhd8crtzT",
    "name": "English",
    "url": "/static/i18n/en.json"
  },
  "es": {
    "dir": "ltr",
    "integrity": "sha384-8XnGwLsOVfidvk1QqQS5UE14ZsOVoMPrPoeyrYxstsFkZI8LTiTogJcWl+0wWXVe",
    "name": "Español",
    "url": "/static/i18n/es.json"
  }
};
