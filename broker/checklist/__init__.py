"""The client's pre-session checks: the practice's checklist policy and the network pre-flight."""
