"""Put the repository root on sys.path: the bench shares the tests' helpers.

bench.py runs as a script (sys.path[0] is bench/); importing this first
lets it import tests.integration.helpers, where the one test daemon lives.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parent.parent)
if ROOT not in sys.path:
    sys.path.insert(1, ROOT)
