"""etokit's test suite, a package so that its helpers have one import path from the repo root:
``from tests.factories import trajectory`` (tests/ itself is not on sys.path, so a bare
``import factories`` fails instead of loading a second copy of the module)."""
