"""``python -m phalanx``: run the ``phalanx`` command line (:func:`phalanx.cli.main`).

Runs in the process the user starts.  The ``__name__`` guard matters: worker
processes started with the *spawn* method re-import the parent's main module
(as ``__mp_main__``) and must not run the command line again.
"""

from phalanx.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
