"""`python scripts/split.py IMAGE_DIR --masks MASK_DIR --ratios 0.8 0.2`: see segkit/cli/split.py."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from segkit.cli.split import main  # noqa: E402

if __name__ == "__main__":
    main()
