"""A module that cannot be imported: workers asked for ``broken_mod:f`` must
report the import failure as an UnknownOperationError and keep serving.

Never imported by the test process itself (it is not a ``test_*`` file).
"""

raise RuntimeError("broken_mod fails at import on purpose")
