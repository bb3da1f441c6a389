"""Manifest paths: the check that keeps every path a store names inside the store's root.
``logitstore.format`` re-exports every public name."""

from __future__ import annotations

import re
from typing import Any

from logitstore.errors import UnsafePathError

_GLOB = "*?[]"
"""Characters fsspec reads as a glob pattern in a path (``glob.has_magic``, and ``]``)."""
_GLOB_CHARS = re.compile(r"[*?\[\]]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


MAX_NAME_BYTES = 255
"""Longest component of a manifest path, in UTF-8 bytes (``NAME_MAX`` of common filesystems)."""

MAX_PATH_BYTES = 1024
"""Longest manifest path, in UTF-8 bytes (an S3 key's limit; ours are under 40)."""


def _shown(path: str) -> str:
    """``repr(path)``, cut to 80 characters for a message."""
    text = repr(path)
    return text if len(text) <= 80 else f"{text[:77]}... ({len(path)} characters)"


def check_relative_path(path: Any, what: str = "path") -> str:
    """Refuse a manifest path that could leave the store's root.

    Only plain relative POSIX paths of ordinary names are accepted: no absolute paths, no
    ``..`` or ``.`` components, no URLs or drive letters, no backslashes, no empty components,
    no glob or control characters, no component longer than :data:`MAX_NAME_BYTES` and no
    path longer than :data:`MAX_PATH_BYTES` (no filesystem or bucket holds such a name: each
    message naming it would be that long).

    Raises:
        UnsafePathError: with the offending path (cut to 80 characters).
    """
    if not isinstance(path, str) or not path:
        raise UnsafePathError(f"{what} must be a non-empty relative path, found {path!r}")
    size = len(path.encode("utf-8", "surrogatepass"))
    longest = max(len(part.encode("utf-8", "surrogatepass")) for part in path.split("/"))
    if size > MAX_PATH_BYTES or longest > MAX_NAME_BYTES:
        raise UnsafePathError(
            f"{what} {_shown(path)} is {size} bytes long, with a name of {longest} bytes; "
            f"expected paths of at most {MAX_PATH_BYTES} bytes and names of at most "
            f"{MAX_NAME_BYTES}"
        )
    bad = (
        path.startswith("/")
        or "\\" in path
        or ":" in path  # URLs (s3://), drive letters (C:)
        or "\x00" in path
        or "~" in path.split("/")[0]
        or any(part in ("", ".", "..") for part in path.split("/"))
    )
    if bad:
        raise UnsafePathError(
            f"{what} {_shown(path)} escapes the store root; expected a relative path"
        )
    if _CONTROL.search(path):
        # a newline or an escape sequence would reach the terminal in every message naming it
        raise UnsafePathError(
            f"{what} {_shown(path)} holds a control character; expected plain file names"
        )
    if _GLOB_CHARS.search(path):
        # fsspec's cat expands these as a pattern: one file entry of "shards/**" would fetch
        # every file of a remote store, on every read of the shard
        raise UnsafePathError(
            f"{what} {_shown(path)} holds a glob character ({_GLOB}); expected plain file names"
        )
    device = next((p for p in path.split("/") if _DEVICE.fullmatch(p.split(".")[0])), None)
    if device is not None:
        # on Windows, "shards/CON.parquet" opens the console (a read that waits for typing),
        # "NUL" the null device, "COM1" a serial port: whatever folder they are in
        raise UnsafePathError(
            f"{what} {_shown(path)} names the Windows device {device!r}; expected plain file names"
        )
    return path


_DEVICE = re.compile(r"(?i)(con|prn|aux|nul|com[0-9¹²³]|lpt[0-9¹²³]|conin\$|conout\$) *")
"""A name Windows reads as a device, with any extension (``NUL.txt`` is ``NUL`` too)."""
