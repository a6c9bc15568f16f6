"""Command line of the conformance harness: ``python -m tests.conformance {cf,joblib} [options]``."""

from __future__ import annotations

import sys

from tests.conformance.runner import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
