"""Crafted foreign files for tests/test_foreign_files.py: run directories, checkpoints, images, studies.

Every builder writes inside a sandbox `root`; `outside` holds a sentinel file that nothing may change and a
gadget (`make_marker`) that creates `marker` if any code path ever calls or imports it from a file's text.
"""

from __future__ import annotations

import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

GADGET = "tests.foreign_corpus.make_marker"
MARKER_ENV = "SEGKIT_TEST_MARKER"


def make_marker(*_args, **_kwargs) -> None:
    """The gadget: called only if segkit ran code a file named."""
    import os

    Path(os.environ[MARKER_ENV]).write_text("code from a foreign file ran")


@dataclass
class Sandbox:
    root: Path  # where the crafted files live
    outside: Path  # a directory the files point at: nothing may appear or change in it
    sentinel: Path
    marker: Path

    @classmethod
    def create(cls, tmp_path: Path) -> Sandbox:
        outside = tmp_path / "outside"
        outside.mkdir()
        sentinel = outside / "sentinel.txt"
        sentinel.write_text("untouched\n")
        root = tmp_path / "foreign"
        root.mkdir()
        return cls(root, outside, sentinel, tmp_path / "marker")

    def link_out(self, link: Path, target_name: str = "sentinel.txt") -> Path:
        """A symlink planted at `link` pointing into `outside` (to the sentinel by default)."""
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(self.outside / target_name if target_name else self.outside)
        return link

    def assert_untouched(self) -> None:
        assert self.sentinel.read_text() == "untouched\n", "the sentinel outside was written to"
        assert sorted(p.name for p in self.outside.iterdir()) == ["sentinel.txt"], "a file appeared outside"
        assert not self.marker.exists(), "code named by a foreign file ran"


def run_dir(root: Path, config_text: str, name: str = "run") -> Path:
    """A run directory whose `.hydra/config.yaml` holds `config_text` as written."""
    path = root / name
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "config.yaml").write_text(config_text)
    return path


def alias_bomb(levels: int = 12) -> str:
    """YAML whose aliases expand 9**levels-fold: a few hundred bytes that would build a huge config."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def nested(depth: int) -> str:
    return "deep: " + "{a: " * depth + "1" + "}" * depth + "\n"


def compressed_checkpoint(path: Path, inflated_bytes: int) -> Path:
    """A zip shaped like torch.save's whose data record is deflated zeros: tiny on disk, huge once read."""
    chunk = bytes(1 << 20)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", b"\x80\x02}q\x00.")  # an empty dict
        info = zipfile.ZipInfo("archive/data/1")
        info.compress_type = zipfile.ZIP_DEFLATED
        with archive.open(info, "w", force_zip64=True) as handle:
            for _ in range(inflated_bytes // len(chunk)):
                handle.write(chunk)
    return path


def png_header(path: Path, width: int, height: int, mode: int = 2) -> Path:
    """A PNG whose header declares width x height (colour type `mode`: 2 RGB, 0 grey) and holds one row."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, mode, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path
