// The client's catalogues and their SHA-384, written by `python -m broker web-manifest build`
// from i18n/*.json (broker/webmanifest/catalogue_pins.py): do not edit by hand.
export const DEFAULT_LANGUAGE = "en";
export const CATALOGUES = {
  "en": {
    "dir": "ltr",
    "integrity": "sha384-8KPrMcbcggpivQoi8M/YSGt13TMIQXv7vCqZnh5Y9je7VyrlZSul3enm+/LULEC+",
    "name": "English",
    "url": "/static/i18n/en.json"
  },
  "es": {
    "dir": "ltr",
    "integrity": "sha384-k7eX+DNFqf3V2XFVpxpSVTmFPmQ60rmDcek/rsiyX+tjPvfTWboQDfpJzPXczyQr",
    "name": "Español",
    "url": "/static/i18n/es.json"
  }
};
