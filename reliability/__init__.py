"""The fault suite: Tally's promises checked against real server processes under faults.

Each scenario in ``reliability/scenarios/`` starts real ``tally serve`` processes, injects one
kind of fault (SIGKILL, a full or read-only filesystem, a poison journal record, slow clients,
overload, hostile bodies, SIGTERM under backlog) and returns ``Findings`` (``findings.py``):
the figures it measured and every promise it saw broken. ``tests/test_faults.py`` runs each at
a bounded size in ``make test``; ``make reliability`` (``python -m reliability.run``) runs them
at a larger size and regenerates the figures in ``docs/reliability.md``.

Nothing here stands in for a real component: the server is the real process, the filesystems
are real mounts (we are root), the store is read back with DuckDB after the server stopped.
"""
