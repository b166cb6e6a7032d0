// The client's catalogues and their SHA-384, written by `python -m broker web-manifest build`
// from i18n/*.json (broker/webmanifest/catalogue_pins.py): do not edit by hand.
export const DEFAULT_LANGUAGE = "en";
export const CATALOGUES = {
  "en": {
    "dir": "ltr",
    "integrity": "sha384-rdZOTnaDieuXrrisLpzn0g6s+J7rIGFIV1XOyl5Rksjf1KvBrwHGfIftnCbwmss8",
    "name": "English",
    "url": "/static/i18n/en.json"
  },
  "es": {
    "dir": "ltr",
    "integrity": "sha384-N+zqI72zRWR/I1U3LPWDruenUcqI64txJc7DAhm6ODTX8Nqg3L7IIfAGHPIpXOU5",
    "name": "Español",
    "url": "/static/i18n/es.json"
  }
};
