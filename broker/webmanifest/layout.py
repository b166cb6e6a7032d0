"""Where the signed web manifest lives: in the web root, so that it ships in the wheel with the files
it lists, and where a broker serves it (docs/protocol.md section 18)."""

from __future__ import annotations

#: The folder of the web root that holds the manifest and its signatures (not listed in the manifest).
RELEASE_DIR = "release"
#: The manifest: canonical JSON, the exact bytes every signature covers.
MANIFEST_FILE = f"{RELEASE_DIR}/web-manifest.json"
#: Its detached signatures: canonical JSON, Ed25519 public key -> signature (both base64url).
SIGNATURES_FILE = f"{RELEASE_DIR}/signatures.json"

#: Where a broker serves them, byte for byte.
WELL_KNOWN = "/.well-known/broker-web/"
MANIFEST_URL = WELL_KNOWN + "manifest.json"
SIGNATURES_URL = WELL_KNOWN + "signatures.json"

#: What a developer runs after changing a file of web/ (from the repository root).
BUILD_COMMAND = "python -m broker web-manifest build"
