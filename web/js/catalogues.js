// The client's catalogues and their SHA-384, written by `python -m broker web-manifest build`
// from i18n/*.json (broker/webmanifest/catalogue_pins.py): do not edit by hand.
export const DEFAULT_LANGUAGE = "en";
export const CATALOGUES = {
  "en": {
    "dir": "ltr",
    "integrity": "sha384-ojbChXw7R3PTmZLKH66qBYGWtWVMXv/jRlnGRfsYCwYUvojncNzdwUhkRhttH7sz",
    "name": "English",
    "url": "/static/i18n/en.json"
  },
  "es": {
    "dir": "ltr",
    "integrity": "sha384-r3rGF+/4XjijXQFeqQGrWvsanO3pYj4/QXbaLuO/ryvirchNkdyY3wS+dmXW4qLp",
    "name": "Español",
    "url": "/static/i18n/es.json"
  }
};
