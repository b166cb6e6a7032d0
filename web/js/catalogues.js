// The client's catalogues and their SHA-384, written by `python -m broker web-manifest build`
// from i18n/*.json (broker/webmanifest/catalogue_pins.py): do not edit by hand.
export const DEFAULT_LANGUAGE = "en";
export const CATALOGUES = {
  "en": {
    "dir": "ltr",
    "integrity": "sha384-P8UEppodUFb3xaLHh5tfOgPfiNlGytBr2dRMuLvBljL9PrnVjA5GJSa+Hpct26CH",
    "name": "English",
    "url": "/static/i18n/en.json"
  },
  "es": {
    "dir": "ltr",
    "integrity": "sha384-9CHTUVILCycXM5ANZ/BqRYJUTnxx4DSUHU2+rEfhPmUPOvtJOsZv9tp66fkgR67Y",
    "name": "Español",
    "url": "/static/i18n/es.json"
  }
};
