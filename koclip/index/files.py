"""Which files an index takes from a folder: the image scan, and the split of a folder into shards."""

from __future__ import annotations

import hashlib
import os
import re
import unicodedata
from pathlib import Path

from koclip.errors import KoclipError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})


def parse_shard(shard) -> tuple[int, int] | None:
    """"i/n" or (i, n) -> (i, n) with 1 <= i <= n, or None for no sharding."""
    if shard is None:
        return None
    if isinstance(shard, str):
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", shard)
        if not m:
            raise ValueError(f"shard must look like 'i/n' (e.g. '2/8'), got {shard!r}")
        shard = (int(m.group(1)), int(m.group(2)))
    i, n = shard
    if not (isinstance(i, int) and isinstance(n, int) and n >= 1 and 1 <= i <= n):
        raise ValueError(f"shard i/n needs 1 <= i <= n, got {i}/{n}")
    return i, n


def in_shard(rel_path: str, shard: tuple[int, int]) -> bool:
    """Whether `rel_path` belongs to shard i of n; decided by a hash of the path alone, so a
    file's shard never depends on which other files exist."""
    i, n = shard
    key = unicodedata.normalize("NFC", rel_path).encode("utf-8", "surrogateescape")
    return int.from_bytes(hashlib.sha1(key).digest()[:8], "big") % n == i - 1


def scan_images(images_dir) -> list[str]:
    """All image files under `images_dir`, recursively, as sorted '/'-separated relative paths.

    Matches IMAGE_EXTENSIONS case-insensitively.  Hidden files and folders
    (".name", e.g. macOS "._IMG.jpg" resource forks) and symlinked folders are skipped.
    """
    root = Path(images_dir)
    if not root.is_dir():
        raise KoclipError(f"images folder {str(root)!r} does not exist or is not a directory")
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel_dir = Path(dirpath).relative_to(root)
        for name in filenames:
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                found.append((rel_dir / name).as_posix())
    found.sort()
    return found
