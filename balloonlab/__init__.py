"""balloonlab's user tools: the command line, the launcher, the control client, the
dashboard, recordings, plots and the protocol transcript.

Nothing in ``hypervisor/``, ``guest/`` or ``protocol/`` imports this package: it sits on top
of them (and its ``bench`` command group runs ``benchmarks/``).
"""
