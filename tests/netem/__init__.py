"""The emulated network shared by the tests and the benchmarks (issue 31): a peer in its own Linux
network namespace behind a veth pair, each direction shaped by ``tc`` and made lossy by ``nft``.

See :mod:`tests.netem.link` for the harness and :mod:`tests.netem.probe` for the UDP probe that
measures it.
"""
