"""`python3 lab/labctl ARGS` (what lab/lab runs): the lab's command line."""

import sys
from pathlib import Path

# Run as a folder, Python puts this folder first on sys.path; put its parent there instead so that
# the package imports as `labctl` (and its modules by their package names, not as top-level files).
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from labctl.cli import main  # noqa: E402 - after the path fix above

sys.exit(main())
