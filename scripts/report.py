"""`python scripts/report.py SWEEP_DIR`: see segkit/cli/report.py."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from segkit.cli.report import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
