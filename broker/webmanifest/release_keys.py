"""The project's release keys: the public keys whose signature of the shipped web manifest says
"this is the browser client the project released" (README, docs/security.md 3.10).

The private key never enters the repository. At release time the maintainer signs the manifest
(``broker web-manifest sign --key ...``) and commits the signatures file before the wheel is built,
so the wheel ships the manifest with its signature; the public key is listed here and in the docs.
None is listed yet: no release has been signed, so a checkout and its wheel are unsigned, and
``broker verify-web`` without ``--key`` compares a broker with the manifest this installation ships.
"""

from __future__ import annotations

#: Public keys (Ed25519, 32 bytes, base64url without padding) that sign the project's releases.
PROJECT_KEYS: tuple[str, ...] = ()
