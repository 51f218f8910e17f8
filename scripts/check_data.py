"""`python scripts/check_data.py <overrides>`: see segkit/cli/check_data.py and conf/check_data.yaml."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from segkit.cli.check_data import main  # noqa: E402

if __name__ == "__main__":
    main()
