"""Teletherapy session broker: signaling for end-to-end encrypted video sessions.

The broker admits people to sessions and relays their WebRTC signaling; it never
receives media and cannot read or silently intercept a call.
"""

__version__ = "0.1.0"
