"""`python scripts/predict.py <overrides>`: see segkit/cli/predict.py and conf/predict.yaml."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from segkit.cli.predict import main  # noqa: E402

if __name__ == "__main__":
    main()
