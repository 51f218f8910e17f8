"""Split list files: one sample stem per line, written by `segkit-split`, read by the folder reader.

Plain text so a split can be reviewed and versioned; blank lines and `#` comments are allowed.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from segkit.errors import DataError


def read_stem_list(path: Path) -> list[str]:
    """Stems listed in `path`, in file order; a stem listed twice is an error naming the file."""
    try:
        lines = path.read_text().splitlines()
    except OSError as error:
        raise DataError(f"{path}: cannot read split list ({error.strerror or error})") from None
    stems: list[str] = []
    seen: set[str] = set()
    for number, line in enumerate(lines, start=1):
        stem = line.split("#", 1)[0].strip()
        if not stem:
            continue
        if stem in seen:
            raise DataError(f"{path}:{number}: stem '{stem}' is listed twice")
        seen.add(stem)
        stems.append(stem)
    return stems


def write_stem_list(path: Path, stems: Iterable[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{stem}\n" for stem in stems))
