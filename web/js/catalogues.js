// The client's catalogues and their SHA-384, written by `python -m broker web-manifest build`
// from i18n/*.json (broker/webmanifest/catalogue_pins.py): do not edit by hand.
export const DEFAULT_LANGUAGE = "en";
export const CATALOGUES = {
  "en": {
    "dir": "ltr",
    "integrity": "sha384-aYxCF6TWwaNuiNlmdHfQTbME5P4RGT9/mFVrD86BqVu6QbXNh53+qR3qGfyve4at",
    "name": "English",
    "url": "/static/i18n/en.json"
  },
  "es": {
    "dir": "ltr",
    "integrity": "sha384-im6fBVOPn0/PLRC3OZEY2qzTLsBBazmRCtxJBQzQGdGVDTAciUKy/Bifbh4Eoaam",
    "name": "Español",
    "url": "/static/i18n/es.json"
  }
};
