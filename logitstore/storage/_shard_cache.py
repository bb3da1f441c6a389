"""The reader's local cache of remote shards: verified files kept under their SHA-256.

Content addressing makes a stale entry impossible: a shard rewritten upstream has another
checksum, hence another entry. An entry is a folder named by the digest holding the shard's
files as ``0``, ``1``, ... in manifest order; it is checked again (sizes and checksum) when
read, and dropped if damaged.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from logitstore.storage import _fs


def entry_folder(cache_dir: Path, entry: Mapping[str, Any]) -> Path | None:
    """Where shard ``entry`` (a manifest record) is cached; ``None`` for an odd digest."""
    digest = str(entry["sha256"])
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        return None  # the name of a cache entry must be a plain hex digest
    return cache_dir / digest[:2] / digest


def load(entry: Mapping[str, Any], folder: Path) -> dict[str, bytes] | None:
    """The cached files of ``entry``, verified; ``None`` if absent or damaged (then removed)."""
    files: dict[str, bytes] = {}
    for i, (name, size) in enumerate(entry["files"]):
        try:
            data = (folder / str(i)).read_bytes()
        except OSError:
            return None
        if len(data) != size:
            break
        files[name] = data
    else:
        if _fs.tree_checksum(files.items()) == entry["sha256"]:
            return files
    shutil.rmtree(folder, ignore_errors=True)  # damaged: dropped, then fetched again
    return None


def save(files: Mapping[str, bytes], entry: Mapping[str, Any], folder: Path) -> None:
    """Cache ``files`` (verified already); a failure leaves no entry and is not an error."""
    # Written under a temporary name then renamed whole, so concurrent readers (DataLoader
    # workers) see a complete entry or none.
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / _fs.temp_name(folder.name)
    try:
        tmp.mkdir()
        for i, (name, _) in enumerate(entry["files"]):
            (tmp / str(i)).write_bytes(files[name])
        os.replace(tmp, folder)
    except OSError:
        pass  # another process cached it first, or the disk is full: reading still works
    finally:
        if tmp.exists():
            for child in tmp.iterdir():
                child.unlink()
            tmp.rmdir()
