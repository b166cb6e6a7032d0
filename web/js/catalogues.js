// The client's catalogues and their SHA-384, written by `python -m broker web-manifest build`
// from i18n/*.json (broker/webmanifest/catalogue_pins.py): do not edit by hand.
export const DEFAULT_LANGUAGE = "en";
export const CATALOGUES = {
  "en": {
    "dir": "ltr",
    "integrity": "sha384-pvTlcR5W9hpBXxJinTmWyPOfInxHxeCvu1/RKbpaWB7666+lc58fkyGDFx0r4bp7",
    "name": "English",
    "url": "/static/i18n/en.json"
  },
  "es": {
    "dir": "ltr",
    "integrity": "sha384-CYyhaoz6baCpod+JMLMV/fTVSV9t8bAwypQf53HAXsklz84asgnQxtiENTo+39e0",
    "name": "Español",
    "url": "/static/i18n/es.json"
  }
};
