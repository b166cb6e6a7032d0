"""A conformance suite anyone can run against a broker (``broker conformance URL``).

It drives the broker as independent peers over what docs/protocol.md documents, and only that:
raw WebSocket frames of JSON written from the document's tables (not this package's own message
definitions, nor the Python client), the documented HTTP routes, and a real WebRTC pre-flight
with aiortc. The end-to-end primitives come from ``broker.crypto``, whose behaviour the published
vectors pin. Sessions are scheduled the documented way for a practice admin: through the
running broker's admin socket, as ``broker session create`` does. Every rule prints one line,
``PASS rule-id: what it says`` or ``FAIL rule-id: what happened``.
"""
