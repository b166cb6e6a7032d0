// The client's catalogues and their SHA-384, written by `python -m broker web-manifest build`
// from i18n/*.json (broker/webmanifest/catalogue_pins.py): do not edit by hand.
export const DEFAULT_LANGUAGE = "en";
export const CATALOGUES = {
  "en": {
    "dir": "ltr",
    "integrity": "sha384-HOhCnx2kPpx2nBAyNR9w1SyO1O74A7V5M/bnb3GopiDgDfdAW2XIcqfNqd1n308w",
    "name": "English",
    "url": "/static/i18n/en.json"
  },
  "es": {
    "dir": "ltr",
    "integrity": "sha384-0epy2hD3mVPRVgimSMX7ykacw/ClAxATlUu/GGZO4U2oe8pi+8kvFxRVQGTGDCNU",
    "name": "Español",
    "url": "/static/i18n/es.json"
  }
};
