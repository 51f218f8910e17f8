"""`python scripts/init_config.py /data/mine --name mine`: see segkit/cli/init_config.py."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from segkit.cli.init_config import main  # noqa: E402

if __name__ == "__main__":
    main()
