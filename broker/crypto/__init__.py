"""End-to-end primitives shared with the browser, and the local TLS certificate."""
