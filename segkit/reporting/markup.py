"""Text for HTML pages and their scripts, from data: numbers formatted, names escaped, paths made relative URLs.

Names come from files (class names, image file names) and are always escaped: as HTML text or attribute
values here, as JSON string escapes in script data (`script_literal`), and the scripts write them with
textContent only.
"""

from __future__ import annotations

import html
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote


def number(value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def attribute_number(value: float | None) -> str:
    """A number in full for a data-* attribute (a script sorts by it); empty where there is none."""
    if value is None or math.isnan(value):
        return ""
    return repr(float(value))


def escaped(value: object) -> str:
    """Any value as HTML text or as a double-quoted attribute value."""
    return html.escape(str(value), quote=True)


def relative_url(path: Path | str, page_dir: Path) -> str:
    """A file in the page's folder (a path as written, absolute or from the working directory, as `page_dir`)
    as a URL relative to the page: percent-encoded, so a `#` or `?` in a file name stays a file name."""
    return quote(Path(os.path.relpath(path, page_dir)).as_posix())


def img(src: Path | str | None, alt: str, page_dir: Path, *, lazy: bool = False,
        size: tuple[int, int] | None = None) -> str:
    """An <img>; `lazy`: loaded when scrolled to; `size` (width, height): its room is kept before it loads, so
    a link to something below it still lands there."""
    if src is None:
        return ""
    loading = ' loading="lazy"' if lazy else ""
    dimensions = f' width="{size[0]}" height="{size[1]}"' if size else ""
    return f'<img src="{escaped(relative_url(src, page_dir))}" alt="{escaped(alt)}"{dimensions}{loading}>'


def hex_color(rgb: Sequence[int]) -> str:
    return "#" + "".join(f"{int(c):02x}" for c in rgb[:3])


def script_literal(value: Any) -> str:
    """`value` as a JavaScript literal that stays data wherever it is placed: strict JSON (NaN refused: None
    stands for no value), non-ASCII escaped (U+2028 ends a line in older JavaScript), and <, > and & escaped,
    so no file name can close a <script> element or open a comment."""
    literal = json.dumps(value, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    return literal.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
