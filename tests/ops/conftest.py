"""Make the ops test helpers (``ops_helpers``, ``tiny_stage``) importable by name, in tests and in the
subprocesses the tests start (their Hydra targets are ``tiny_stage.*``)."""

import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
