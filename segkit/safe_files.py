"""Every file segkit writes goes through here: never through a symlink planted in a directory someone else made.

A run directory, a sweep or an output folder may come from someone else (a shared drive, an unpacked
archive). A symlink inside it (`checkpoints -> /home/you/.ssh`, `metrics.json -> ~/.bashrc`) would
make an ordinary write land wherever the link points. So:

- the directory the user named (`root`: the run directory, `--out`, the folder of the file named on
  the command line) is taken as it is, symlink or not; every component below it is opened with
  O_NOFOLLOW relative to its parent's descriptor (no window between check and use) and created
  when missing;
- a file is written to a new temporary file created in its directory with O_CREAT|O_EXCL|O_NOFOLLOW
  under an unpredictable name, flushed and fsynced, then renamed over the target (os.replace on
  the directory descriptors), and the directory is fsynced: a crash leaves the old file or the new
  one, never half of one;
- a target that is a symlink or not a regular file is refused with one line naming it; nothing is
  written;
- the run lock and append-only logs are opened the same way (`open_lock`, `open_append`).
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import logging
import os
import secrets
import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from segkit.errors import SegkitError

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafePathError(SegkitError):
    """A write would go through a symlink or into something that is not a plain file or directory."""


def _refuse(path: Path, what: str) -> UnsafePathError:
    return UnsafePathError(f"{path}: {what}; refused: segkit writes only plain files, never through a link "
                           "it did not make. Remove it or choose another output directory")


def _parts(path: Path, root: Path | None) -> tuple[Path, list[str]]:
    """(the directory the user named, the components below it down to `path`'s parent)."""
    path = Path(os.path.abspath(path))
    base = Path(os.path.abspath(root)) if root is not None else path.parent
    try:
        below = path.parent.relative_to(base).parts
    except ValueError:  # `path` is not below `root`: only its own directory is taken as named
        base, below = path.parent, ()
    return base, [p for p in below if p not in ("", ".")]


def open_dir(directory: Path, root: Path | None = None, create: bool = True) -> int:
    """A descriptor of `directory`; components below `root` (default: `directory` itself) never follow links."""
    directory = Path(os.path.abspath(directory))
    base, below = _parts(directory / "x", root if root is not None else directory)
    if create:
        base.mkdir(parents=True, exist_ok=True)  # the user named it: their links are theirs
    fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    where = base
    try:
        for part in below:
            where = where / part
            if part == "..":
                raise _refuse(where, "a path that climbs out of its directory")
            try:
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o777, dir_fd=fd)
                child = _open_child_dir(part, fd, where)
            except OSError:
                raise _describe(part, fd, where) from None
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_child_dir(part: str, fd: int, where: Path) -> int:
    try:
        return os.open(part, _DIR_FLAGS, dir_fd=fd)
    except OSError:
        raise _describe(part, fd, where) from None


def _describe(name: str, dir_fd: int, where: Path) -> UnsafePathError:
    try:
        info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError as error:
        return UnsafePathError(f"{where}: cannot open ({error.strerror or error})")
    if stat.S_ISLNK(info.st_mode):
        return _refuse(where, "is a symlink")
    return _refuse(where, "is not a directory")


def _check_target(name: str, dir_fd: int, where: Path) -> None:
    """The file about to be replaced must be absent or a regular file (never a link, fifo or device)."""
    try:
        info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(info.st_mode):
        raise _refuse(where, "is a symlink")
    if not stat.S_ISREG(info.st_mode):
        raise _refuse(where, "is not a regular file")


@contextlib.contextmanager
def atomic_write(path: Path | str, mode: str = "wb", root: Path | str | None = None,
                 encoding: str | None = None, newline: str | None = None, sync: bool = True) -> Iterator[IO[Any]]:
    """Yield a file that becomes `path` (atomically, fsynced) when the block ends without an error.

    `sync=False` skips the fsyncs (the file still replaces its target whole, never through a link): for the
    many small files a command can write again (a data set page's thumbnails), where a fsync each would cost
    more than drawing them."""
    path = Path(os.path.abspath(path))
    fd_dir = open_dir(path.parent, Path(root) if root is not None else None)
    tmp = f".{path.name}.{secrets.token_hex(6)}.tmp"
    try:
        _check_target(path.name, fd_dir, path)
        _remove_stale_temporaries(path.name, fd_dir)
        fd = os.open(tmp, _NEW_FILE, 0o644, dir_fd=fd_dir)
        try:
            kwargs: dict[str, Any] = {} if "b" in mode else {"encoding": encoding or "utf-8", "newline": newline}
            with os.fdopen(fd, mode, **kwargs) as handle:
                # Held until the temporary is renamed: another writer of the same file leaves it alone.
                # (A file system without locks still has the age rule of _is_abandoned.)
                with contextlib.suppress(OSError):
                    fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
                yield handle
                handle.flush()
                if sync:
                    os.fsync(handle.fileno())
                _check_target(path.name, fd_dir, path)
                os.replace(tmp, path.name, src_dir_fd=fd_dir, dst_dir_fd=fd_dir)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=fd_dir)
            raise
        if sync:
            with contextlib.suppress(OSError):
                os.fsync(fd_dir)
    finally:
        os.close(fd_dir)


# A temporary younger than this may belong to a writer that has created it but not locked it yet.
_STALE_AFTER_S = 60.0


def _remove_stale_temporaries(name: str, dir_fd: int) -> None:
    """Temporary files an interrupted write of `name` left behind (unlink removes a link, never its target).

    Another process may be writing the same file at this moment (two search workers, say): its temporary is
    locked, or too young to tell, and stays."""
    for entry in os.listdir(dir_fd):
        if entry.startswith(f".{name}.") and entry.endswith(".tmp") and _is_abandoned(entry, dir_fd):
            with contextlib.suppress(OSError):
                os.unlink(entry, dir_fd=dir_fd)


def _is_abandoned(entry: str, dir_fd: int) -> bool:
    try:
        info = os.stat(entry, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return False
    if not stat.S_ISREG(info.st_mode):
        return True  # planted: a writer only ever creates regular files
    if time.time() - info.st_mtime < _STALE_AFTER_S:
        return False
    try:
        fd = os.open(entry, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False  # a live writer holds it
    except OSError:
        pass  # a file system without locks: the age alone decides
    finally:
        os.close(fd)
    return True


def write_bytes(path: Path | str, data: bytes, root: Path | str | None = None, sync: bool = True) -> Path:
    with atomic_write(path, "wb", root, sync=sync) as handle:
        handle.write(data)
    return Path(path)


def write_text(path: Path | str, text: str, root: Path | str | None = None) -> Path:
    with atomic_write(path, "w", root) as handle:
        handle.write(text)
    return Path(path)


def write_with(path: Path | str, save: Any, root: Path | str | None = None) -> Path:
    """For libraries that write to a file object or a path: `save(buffer)` fills memory, then one safe write."""
    buffer = io.BytesIO()
    save(buffer)
    return write_bytes(path, buffer.getvalue(), root)


def make_dirs(directory: Path | str, root: Path | str | None = None) -> Path:
    """mkdir -p that refuses a symlink below `root` (default: `directory`'s parent)."""
    directory = Path(os.path.abspath(directory))
    os.close(open_dir(directory, Path(root) if root is not None else directory.parent))
    return directory


def _open_existing_or_new(path: Path, flags: int, root: Path | str | None) -> int:
    path = Path(os.path.abspath(path))
    fd_dir = open_dir(path.parent, Path(root) if root is not None else None)
    try:
        try:
            fd = os.open(path.name, flags | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o644,
                         dir_fd=fd_dir)
        except OSError as error:
            if error.errno in (40, 20, 21, 6):  # ELOOP (a symlink), ENOTDIR, EISDIR, ENXIO (a fifo / socket)
                raise _describe_file(path.name, fd_dir, path) from None
            raise
    finally:
        os.close(fd_dir)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise _refuse(path, "is not a regular file")
    os.set_blocking(fd, True)
    return fd


def _describe_file(name: str, dir_fd: int, where: Path) -> UnsafePathError:
    try:
        info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError as error:
        return UnsafePathError(f"{where}: cannot open ({error.strerror or error})")
    return _refuse(where, "is a symlink" if stat.S_ISLNK(info.st_mode) else "is not a regular file")


def open_append(path: Path | str, root: Path | str | None = None, newline: str | None = None) -> IO[str]:
    """A text file opened for appending (created if missing), never through a link."""
    fd = _open_existing_or_new(Path(path), os.O_WRONLY | os.O_APPEND, root)
    return os.fdopen(fd, "a", encoding="utf-8", newline=newline)


def open_lock(path: Path | str, root: Path | str | None = None) -> IO[str]:
    """The run lock file, read-write, created if missing, never through a link; the caller flocks it."""
    fd = _open_existing_or_new(Path(path), os.O_RDWR, root)
    return os.fdopen(fd, "r+", encoding="utf-8")


def refuse_links(directory: Path | str) -> None:
    """Refuse a directory (and everything below it) that holds a symlink or anything but files and directories:
    for tools whose writers are libraries (charts, images) writing into an output directory."""
    directory = Path(directory)
    for top, dirs, files in os.walk(directory, followlinks=False):
        for name in [*dirs, *files]:
            info = os.lstat(Path(top) / name)
            if stat.S_ISLNK(info.st_mode):
                raise _refuse(Path(top) / name, "is a symlink")
            if not (stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode)):
                raise _refuse(Path(top) / name, "is not a regular file")


def is_regular_file(path: Path | str) -> bool:
    """A plain file, not reached through a symlink: what segkit reads as a run's own file."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


class LogFile(logging.FileHandler):
    """logging.FileHandler (Hydra's train.log) that appends through `open_append`.

    Hydra builds it before any segkit code runs, inside logging.config, which would turn a refusal into a
    traceback of its own: a refused file ends the command here, with the refusal as its one line."""

    def _open(self):  # noqa: ANN202 - logging's own signature
        try:
            return open_append(self.baseFilename, newline=None)
        except UnsafePathError as error:
            print(f"error: {error}", file=sys.stderr)
            raise SystemExit(2) from None


# YAML's own types; `!!python/...` shares the prefix `tag:yaml.org,2002:` and is refused with any other tag.
PLAIN_TAGS = frozenset(f"tag:yaml.org,2002:{name}" for name in ("str", "int", "float", "bool", "null", "map", "seq"))
MAX_RUN_FILE_BYTES = 16 << 20  # a run's JSON / YAML records are a few KiB


def read_run_text(path: Path | str, limit: int = MAX_RUN_FILE_BYTES) -> str:
    """A run's own record (metrics.json, .hydra/*.yaml): a regular file, not through a link, at most `limit` bytes."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as error:
        if error.errno in (40, 6):  # ELOOP: a symlink; ENXIO: a socket
            raise _read_refusal(path, "is a symlink or not a regular file") from None
        raise
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise _read_refusal(path, "is not a regular file")
        if info.st_size > limit:
            raise _read_refusal(path, f"holds {info.st_size} bytes, more than a run record's {limit} "
                                      "(segkit.safe_files.MAX_RUN_FILE_BYTES)")
        data = handle.read(limit + 1)[:limit]
    return data.decode("utf-8", errors="replace")


def read_plain_yaml(path: Path | str, limit: int = MAX_RUN_FILE_BYTES) -> Any:
    """A run's YAML record as plain data: YAML's own types only (no tag, no alias that could expand a small
    file into a huge one); interpolations stay text."""
    import yaml

    text = read_run_text(path, limit)
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent):
                raise _read_refusal(Path(path), f"line {event.start_mark.line + 1}: a YAML alias")
            tag = getattr(event, "tag", None)
            if tag and tag not in PLAIN_TAGS:
                raise _read_refusal(Path(path), f"line {event.start_mark.line + 1}: YAML tag {tag!r}")
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise UnsafePathError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None


def _read_refusal(path: Path, what: str) -> UnsafePathError:
    return UnsafePathError(f"{path}: {what}; refused: a run's records are plain files of plain values. "
                           "Remove it, or read the run with --trust if it is yours")


def check_checkpoint_archive(path: Path | str) -> None:
    """Before torch.load: a zip archive (torch's format since 1.6) whose records are stored, not compressed,
    and declare no more bytes than the file holds, so reading it allocates no more than its own size.
    torch.save writes exactly that; a crafted archive of compressed records (a small file that inflates to
    gigabytes) or the legacy format (storage sizes declared in the pickle) is refused before allocating."""
    import zipfile

    path = Path(path)
    try:
        size = os.path.getsize(path)
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except zipfile.BadZipFile:
        raise _checkpoint_refusal(path, "truncated or corrupt checkpoint, or not a zip archive (torch.save's "
                                        "format; the legacy format is not read)") from None
    except OSError as error:
        raise UnsafePathError(f"{path}: cannot read ({error.strerror or error})") from None
    compressed = next((m.filename for m in members if m.compress_type != zipfile.ZIP_STORED), None)
    if compressed is not None:
        raise _checkpoint_refusal(path, f"record {compressed!r} is compressed (torch.save stores records as they "
                                        "are; a compressed one can inflate far beyond the file)")
    declared = sum(m.file_size for m in members)
    if declared > size:
        raise _checkpoint_refusal(path, f"its records declare {declared} bytes in a file of {size}")


def _checkpoint_refusal(path: Path, what: str) -> SegkitError:
    from segkit.errors import CheckpointError

    return CheckpointError(f"{path}: {what}; refused before loading. Save it again with torch.save")


MAX_CONFIG_BYTES = 1 << 20  # a stored config is a few KiB
MAX_NESTING = 32  # mappings and lists inside one another


def check_config_text(text: str, source: str | Path) -> None:
    """A stored config's YAML before anything parses it into objects: at most MAX_CONFIG_BYTES, no alias (a
    few hundred bytes of aliases expand into gigabytes), no tag beyond YAML's own types, nested at most
    MAX_NESTING deep. Reads the event stream only: nothing is built and nothing recurses."""
    import yaml

    from segkit.errors import CheckpointError

    if len(text) > MAX_CONFIG_BYTES:
        raise CheckpointError(f"{source}: stored config holds {len(text)} characters, more than "
                              f"{MAX_CONFIG_BYTES} (segkit.safe_files.MAX_CONFIG_BYTES); refused")
    depth = 0
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            line = event.start_mark.line + 1
            if isinstance(event, yaml.AliasEvent):
                raise CheckpointError(f"{source}: stored config line {line}: a YAML alias refused (aliases can "
                                      "expand a small file into a huge config)")
            tag = getattr(event, "tag", None)
            if tag and tag not in PLAIN_TAGS:
                raise CheckpointError(f"{source}: stored config line {line}: YAML tag {tag!r} refused")
            if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                depth += 1
                if depth > MAX_NESTING:
                    raise CheckpointError(f"{source}: stored config line {line}: nested more than {MAX_NESTING} "
                                          "levels deep (segkit.safe_files.MAX_NESTING); refused")
            elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                depth -= 1
    except yaml.YAMLError as error:
        raise CheckpointError(f"{source}: stored config is not valid YAML ({str(error).splitlines()[0]})") from None


def check_json_text(text: str, source: str | Path) -> None:
    """JSON from a foreign file (a safetensors export's metadata) before json.loads: at most MAX_CONFIG_BYTES,
    nested at most MAX_NESTING deep (json.loads recurses: a deep nest is a crash, not data). One pass over the
    characters, strings skipped."""
    from segkit.errors import CheckpointError

    if len(text) > MAX_CONFIG_BYTES:
        raise CheckpointError(f"{source}: {len(text)} characters of JSON, more than {MAX_CONFIG_BYTES} "
                              "(segkit.safe_files.MAX_CONFIG_BYTES); refused")
    depth, in_string, escaped = 0, False, False
    for char in text:
        if in_string:
            escaped, in_string = (not escaped and char == "\\"), in_string and (escaped or char != '"')
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > MAX_NESTING:
                raise CheckpointError(f"{source}: JSON nested more than {MAX_NESTING} levels deep "
                                      "(segkit.safe_files.MAX_NESTING); refused")
        elif char in "]}":
            depth -= 1
