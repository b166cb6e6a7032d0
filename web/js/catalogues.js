// The client's catalogues and their SHA-384, written by `python -m broker web-manifest build`
// from i18n/*.json (broker/webmanifest/catalogue_pins.py): do not edit by hand.
export const DEFAULT_LANGUAGE = "en";
export const CATALOGUES = {
  "en": {
    "dir": "ltr",
    "integrity": "sha384-EXz15wixoFT91quJOiWk5gAeZKAtAFRlL8rubwmBtQsig1Xdgf1JefZL7He/h1Ox",
    "name": "English",
    "url": "/static/i18n/en.json"
  },
  "es": {
    "dir": "ltr",
    "integrity": "sha384-xJSlQqGShrGPeYX6sP3BHeaWLf+t4RkDvVInYgx6qxN1t+pwR1ITB7Eg7wnGxpFz",
    "name": "Español",
    "url": "/static/i18n/es.json"
  }
};
