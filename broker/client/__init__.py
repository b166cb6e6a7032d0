"""The Python client: one peer of a session over the signaling protocol, with aiortc."""
