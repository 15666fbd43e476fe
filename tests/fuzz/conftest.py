"""Fuzz suite: see fuzz_common.py for the budgets (seconds in CI, ``EDGEML_FUZZ=long`` for minutes)."""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
# fuzz_common (this folder) and the tiny real ONNX models of tests/runtime (unique module names)
for folder in (_HERE, _HERE.parent / "runtime"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
