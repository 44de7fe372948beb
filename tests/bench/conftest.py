"""Make the repository root importable, so the tests drive ``bench`` the way ``bench/run`` does."""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
