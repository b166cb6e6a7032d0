"""The signaling service: wire protocol, session state machine, hub, admission, seats and the session record."""
