"""What an operator sees of a running broker: Prometheus metrics that carry nothing about a person.

Every metric is defined in one table (``registry.py``), each label's values come from a small
fixed set (``labels.py``: codes, states, roles, outcomes; never an id, token or address), the
process's own health (event-loop lag, garbage-collector pauses, memory) is watched in
``runtime.py``, what is counted at scrape time in ``scrape.py``, what /readyz says (and a session
Redis that came back empty) in ``readiness.py``, and ``site.py`` serves it all
on a listen address of its own, never on the public port.
"""
