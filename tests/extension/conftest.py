"""The browser fixtures of tests/browser (one Chromium, one Firefox ESR per test session)."""

from tests.browser.conftest import chromium, firefox, new_context, playwright, watch  # noqa: F401
