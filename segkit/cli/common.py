"""What the inference entry points share: the conf/ directory and one-line error reporting."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from omegaconf.errors import OmegaConfBaseException

from segkit.errors import SegkitError, one_line

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")
T = TypeVar("T")


def run_or_exit(job: Callable[[], T]) -> T:
    """Run `job`; a user-fixable error becomes `error: <one line>` on stderr and exit status 2."""
    try:
        return job()
    except (SegkitError, OmegaConfBaseException) as error:
        message = one_line(error) if isinstance(error, SegkitError) else str(error).splitlines()[0]
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def json_safe(value: Any) -> Any:
    """NaN (a class with no pixels) becomes null, so the files are strict JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    return json.dumps(json_safe(value), allow_nan=False, **kwargs)
