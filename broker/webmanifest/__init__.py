"""The browser client as released: a signed manifest of every file the broker serves to a browser.

``pins`` writes each script's and stylesheet's SHA-384 into the pages (SRI, one import map for the
modules), ``manifest`` lists every file with its digest and the headers that must come with it,
``canonical`` makes that list the same bytes on every build, ``signing`` signs it with Ed25519,
``release`` builds, checks and signs the copy kept in the web root (``layout``), and ``monitor``
checks from outside what a running broker serves (``broker verify-web``), fetching as a browser
does (``fetcher``) and following what each page and module loads (``references``).
"""
