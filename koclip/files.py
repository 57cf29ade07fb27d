"""Small file helpers every writer shares: atomic replacement and the cache folder.

    with replacing(path) as tmp:       # write tmp (by path: numpy, faiss, ...)
        np.save(tmp, array)
    atomic_write(path, lambda f: f.write(data))
    cache_root() / "mini"              # $KOCLIP_CACHE, else $XDG_CACHE_HOME/koclip, else ~/.cache/koclip

A replaced file is complete or absent, never half-written: the new content
goes to a temporary file beside it (same directory, so the rename stays on one
file system), is flushed to disk, and is renamed over the old one; then the
directory entry itself is flushed.  Temporary names are `.<name>.<hex>.tmp`,
so a writer killed half-way leaves only something easy to recognise and sweep.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

CACHE_ENV = "KOCLIP_CACHE"
TEMP_SUFFIX = ".tmp"


def cache_root() -> Path:
    """koclip's cache folder: $KOCLIP_CACHE, else $XDG_CACHE_HOME/koclip, else ~/.cache/koclip.
    Not created here."""
    env = os.environ.get(CACHE_ENV, "").strip()
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(base).expanduser() if base else Path.home() / ".cache") / "koclip"


def temp_path(path: Path) -> Path:
    """A fresh temporary name beside `path`."""
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}{TEMP_SUFFIX}")


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path` for the block to write; when the block ends normally,
    flush that file to disk and rename it onto `path` atomically.  If the block raises (or the file
    was not written), the temporary file is removed and `path` is left as it was."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def atomic_write(path: str | os.PathLike, write: Callable, *, text: bool = False) -> None:
    """Replace `path` atomically with what write(f) writes to an open file (binary, or UTF-8 text
    with newlines as given when `text`)."""
    with replacing(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") if text else open(tmp, "wb") as f:
            write(f)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, data: str) -> None:
    atomic_write(path, lambda f: f.write(data), text=True)
