"""fsspec utilities: one code path for local paths, ``memory://``, ``s3://`` and ``hf://``.

Atomicity differs by filesystem. A local rename is atomic, so local files are written under a
temporary name and renamed. Object stores have no rename (``mv`` is copy then delete), but a
single object PUT is atomic, so there files are written in place and the *record* written after
them is the commit point.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import fsspec
from fsspec.implementations.cached import CachingFileSystem
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem

from logitstore.errors import (
    ConfigError,
    CorruptShardError,
    ManifestError,
    StoreReadError,
    UnsafePathError,
)
from logitstore.storage import _remote
from logitstore.storage._limits import MAX_JSON_BYTES, json_problem

TMP_PREFIX = ".tmp-"
"""Prefix of every temporary name; nothing committed ever carries it."""


def url_to_fs(url: str, storage_options: Mapping[str, Any] | None = None) -> tuple[Any, str]:
    """The filesystem and the root path (no trailing slash) of a store URL or local path.

    Raises:
        ConfigError: fsspec cannot make a filesystem of it (an unknown protocol, a missing
            package, options the filesystem does not take).
    """
    try:
        fs, root = fsspec.core.url_to_fs(str(url), **dict(storage_options or {}))
    except (ValueError, ImportError, TypeError, KeyError) as exc:
        raise ConfigError(f"cannot open {str(url)!r}: {_remote.describe(exc)}") from None
    return fs, root.rstrip("/") or root


def is_local(fs: Any) -> bool:
    """Whether ``fs`` is the local filesystem, where renames are atomic."""
    return isinstance(fs, LocalFileSystem)


def join(root: str, rel: str) -> str:
    """``root/rel`` for fsspec paths (always ``/``, whatever the OS)."""
    if not root:
        return rel
    return f"{root}{rel}" if root.endswith("/") else f"{root}/{rel}"


def temp_name(path: str) -> str:
    """A unique temporary sibling of ``path`` (same directory, so a rename stays local)."""
    head, _, tail = path.rpartition("/")
    name = f"{TMP_PREFIX}{uuid.uuid4().hex[:12]}-{tail}"
    return f"{head}/{name}" if head else name


def read_bytes(fs: Any, path: str) -> bytes:
    """Whole file contents; ``FileNotFoundError`` when absent."""
    return bytes(fs.cat_file(path))


def exists(fs: Any, path: str) -> bool:
    return bool(fs.exists(path))


def write_bytes_atomic(fs: Any, path: str, data: bytes) -> None:
    """Write one file so that readers see either nothing or all of ``data``."""
    parent = path.rpartition("/")[0]
    if is_local(fs):
        if parent:
            fs.makedirs(parent, exist_ok=True)
        tmp = temp_name(path)
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    else:
        fs.pipe_file(path, data)


def create_exclusive(fs: Any, path: str, data: bytes) -> bool:
    """Create ``path`` only if it does not exist yet.

    Locally the data goes to a temporary file that is then hard-linked to ``path``: ``link``
    fails if ``path`` exists (atomic between processes, like ``O_EXCL``) and, unlike an
    ``O_EXCL`` create followed by a write, a process killed in between never leaves an empty
    ``path`` behind (an empty ``settings.json`` would make the store unresumable). Where hard
    links are not supported, ``O_EXCL`` is used. fsspec filesystems that support mode ``"xb"``
    are used the same way; others fall back to check-then-write, which is racy but still
    catches the common mistake of two ranks given the same shard plan.

    Returns:
        True if this call created the file, False if it already existed.
    """
    parent = path.rpartition("/")[0]
    if is_local(fs):
        if parent:
            os.makedirs(parent, exist_ok=True)
        tmp = temp_name(path)
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)
                return True
            except FileExistsError:
                return False
            except OSError:
                pass  # no hard links here (some network or FAT filesystems): O_EXCL below
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True
    try:
        with fs.open(path, "xb") as f:
            f.write(data)
        return True
    except FileExistsError:
        return False
    except (ValueError, NotImplementedError, TypeError):
        if fs.exists(path):
            return False
        fs.pipe_file(path, data)
        return True


def remove(fs: Any, path: str) -> None:
    """Remove a file or directory tree if it exists; never raises for a missing path."""
    try:
        if fs.isdir(path):
            fs.rm(path, recursive=True)
        elif fs.exists(path):
            fs.rm_file(path)
    except FileNotFoundError:
        pass


def write_tree(fs: Any, root: str, files: Mapping[str, bytes]) -> None:
    """Write ``{relative name: bytes}`` under ``root`` (directories created as needed)."""
    if is_local(fs):
        for rel, data in files.items():
            path = join(root, rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
    else:
        fs.pipe({join(root, rel): data for rel, data in files.items()})


def rename(fs: Any, src: str, dst: str) -> None:
    """Move ``src`` to ``dst`` (atomic locally; copy then delete elsewhere)."""
    if is_local(fs):
        os.replace(src, dst)
    else:
        fs.mv(src, dst, recursive=True)


def list_names(fs: Any, path: str) -> list[str]:
    """Base names directly under ``path`` (empty when it does not exist)."""
    try:
        entries = fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    names = [str(e).rstrip("/").rpartition("/")[2] for e in entries]
    return sorted(n for n in names if n)


def tree_checksum(files: Iterable[tuple[str, bytes]]) -> str:
    """SHA-256 over a shard's files in sorted name order.

    Each file contributes ``name``, a zero byte, its length as 8 little-endian bytes, then its
    bytes, so neither renaming nor moving bytes between files keeps the digest.
    """
    h = hashlib.sha256()
    for name, data in sorted(files, key=lambda item: item[0]):
        h.update(name.encode("utf-8") + b"\x00" + len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def options_from_json(text: str | None) -> dict[str, Any] | None:
    """fsspec ``storage_options`` from a command line's JSON text (``None`` passes through).

    Raises:
        ConfigError: not a JSON object.
    """
    if text is None:
        return None
    import json

    from logitstore.errors import ConfigError

    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"--storage-options must be a JSON object, found {text!r} ({exc})"
        ) from None
    if not isinstance(value, dict):
        raise ConfigError(f"--storage-options must be a JSON object, found {type(value).__name__}")
    return value


# -- reading a store's files: inside its root, bounded, retried --------------------------------


def local_target(fs: Any, path: str) -> str | None:
    """The local file ``fs`` reads for ``path``, or ``None`` when no local file is behind it.

    Chained URLs wrap a filesystem in another (``simplecache::/data/store``, ``dir::``,
    ``file://``): the wrappers are unwrapped, so links are checked on every URL form.
    """
    for _ in range(16):  # chains are short; a cycle of wrappers is not followed forever
        if isinstance(fs, LocalFileSystem):
            return str(fs._strip_protocol(path))
        if isinstance(fs, DirFileSystem):
            path, fs = fs._join(path), fs.fs
        elif isinstance(fs, CachingFileSystem) or isinstance(
            getattr(fs, "fs", None), fsspec.AbstractFileSystem
        ):
            fs = fs.fs  # cache wrappers read the target's own paths
        else:
            return None
    return None


class _Resolver:
    """``os.path.realpath`` for paths under one root, remembering the directories it resolved.

    A shard is a few dozen files in a few nested folders: ``realpath`` of each would examine
    every component from ``/`` again (hundreds of ``lstat`` calls a shard). Here each
    component below the root is examined once per call of :func:`refuse_links_out`; a
    symbolic link, or any path not a plain name under the root, goes to ``realpath`` itself.
    """

    def __init__(self, local_root: str, real_root: str) -> None:
        self.prefix = local_root.rstrip("/") + "/"
        self.known: dict[str, str] = {"": real_root}

    def __call__(self, local: str) -> str:
        if not local.startswith(self.prefix):
            return os.path.realpath(local)
        parts = local[len(self.prefix) :].split("/")
        if any(part in ("", ".", "..") for part in parts):
            return os.path.realpath(local)
        done = ""
        real = self.known[""]
        for part in parts:
            done = f"{done}/{part}"
            hit = self.known.get(done)
            if hit is None:
                hit = os.path.join(real, part)
                try:
                    if stat.S_ISLNK(os.lstat(hit).st_mode):
                        hit = os.path.realpath(hit)
                except OSError:
                    pass  # missing: resolved lexically from here, as realpath does
                self.known[done] = hit
            real = hit
        return real


_HUB_REPO = re.compile(r"(models|datasets|spaces)--[^/]+")


def hub_cache_blobs(real_root: str) -> str | None:
    """The ``blobs`` folder of the Hugging Face cache repository that ``real_root`` is a
    snapshot of (or lies in), or ``None``.

    ``huggingface_hub`` downloads into ``<cache>/datasets--ORG--NAME/blobs/<hash>`` and makes
    each file of a revision a link ``snapshots/<revision>/<path> -> ../../blobs/<hash>``: a
    store downloaded there is all links out of its folder, into files of the same download.
    Those (and only those: a file right in that repository's own ``blobs`` folder, which is
    no link itself) are read as the store's own.
    """
    parts = real_root.split("/")
    for i in range(len(parts) - 2, 0, -1):
        if parts[i] == "snapshots" and _HUB_REPO.fullmatch(parts[i - 1]):
            blobs = "/".join([*parts[:i], "blobs"])
            try:
                plain = stat.S_ISDIR(os.lstat(blobs).st_mode)
            except OSError:
                return None
            return blobs if plain else None
    return None


def refuse_links_out(fs: Any, root: str, paths: Iterable[str], where: str) -> None:
    """Refuse files that a symbolic link resolves to outside the store's root, or that are
    not regular files (a FIFO would block a reader, a device would never end).

    Manifest paths are checked to be plain relative names, but a link inside the store (to
    ``/etc/...`` or ``../other``) could still lead reads elsewhere, on any URL whose
    filesystem is local underneath.

    Raises:
        UnsafePathError: naming the store-relative path.
    """
    local_root = local_target(fs, root)
    if local_root is None:
        return
    real_root = os.path.realpath(local_root)
    resolve = _Resolver(local_root, real_root)
    blobs = hub_cache_blobs(real_root)
    for path in paths:
        local = local_target(fs, path)
        real = resolve(local if local is not None else path)
        rel = path[len(root) + 1 :] if path.startswith(root + "/") else path
        inside = os.path.commonpath([real_root, real]) == real_root
        if not inside and not (blobs is not None and os.path.dirname(real) == blobs):
            raise UnsafePathError(
                f"{where}: {rel} is a link to {_remote.printable(real)}, outside the store's "
                f"root {real_root}; expected files inside the store"
            )
        try:
            mode = os.stat(real).st_mode
        except OSError:
            continue  # missing: reported as missing by the read
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise UnsafePathError(f"{where}: {rel} is not a regular file")


SPARSE_MIN_BYTES = 1 << 24
"""Files larger than this are checked for holes before they are read (see :func:`_read_local`)."""


def _sparse(fd: int, st: os.stat_result) -> bool:
    """Whether a file holds far more bytes than it stores: a sparse file (a hole of zeros the
    filesystem does not store, made by a seek or ``truncate``; tar extracts them too) of
    16 times its blocks or more. Filesystems without ``SEEK_HOLE`` report no hole."""
    blocks = getattr(st, "st_blocks", None)
    hole = getattr(os, "SEEK_HOLE", None)
    if blocks is None or hole is None or st.st_size <= 16 * blocks * 512:
        return False
    try:
        return os.lseek(fd, 0, hole) < st.st_size
    except OSError:
        return False
    finally:
        os.lseek(fd, 0, os.SEEK_SET)  # the read that follows starts at the beginning


def _read_local(path: str, limit: int, where: str | None = None) -> bytes | FileNotFoundError:
    """At most ``limit`` bytes of a local file (a longer file shows as longer than expected
    without being read whole), or ``FileNotFoundError``.

    With ``where`` (naming a shard file, whose size the manifest bounds by itself), a sparse
    file of more than :data:`SPARSE_MIN_BYTES` is refused before it is read: its size is no
    measure of the bytes behind it, and reading it would allocate all of it.
    """
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            n = min(limit, st.st_size + 1)
            if where is not None and n > SPARSE_MIN_BYTES and _sparse(f.fileno(), st):
                raise CorruptShardError(
                    f"{where} is a sparse file of {st.st_size} bytes with "
                    f"{st.st_blocks * 512} on disk; expected a file whose bytes are stored"
                )
            # read(n) allocates n bytes first: never more than the file holds, whatever the
            # manifest declares
            return f.read(n)
    except OSError as exc:
        if _remote.is_missing(exc):
            return FileNotFoundError(path)
        raise StoreReadError(f"cannot read {path}: {_remote.describe(exc)}") from None


def read_files(
    fs: Any, root: str, sizes: Mapping[str, int], where: str
) -> dict[str, bytes | FileNotFoundError]:
    """Store files ``{relative path: expected size}``: their bytes, or ``FileNotFoundError``.

    Local files (on any URL form) are checked not to lead outside the root and are read up to
    one byte past their expected size; remote ones are fetched together, up to the same byte
    (a ranged read), transient network errors retried (see :mod:`logitstore.storage._remote`).

    Raises:
        UnsafePathError: a file is a link out of the store, or not a regular file.
        CorruptShardError: a local file is sparse (far larger than what it stores).
        StoreReadError: a file exists but cannot be read (after retries, if remote).
    """
    paths = {join(root, name): name for name in sizes}
    refuse_links_out(fs, root, paths, where)
    if is_local(fs):  # fsspec's cat costs more here
        return {
            name: _read_local(path, sizes[name] + 1, f"{where}: file {name}")
            for path, name in paths.items()
        }
    got = _remote.cat(fs, paths, {path: sizes[name] + 1 for path, name in paths.items()})
    return {name: got[path] for path, name in paths.items()}


def read_json(fs: Any, root: str, name: str, max_bytes: int = MAX_JSON_BYTES) -> bytes:
    """The bytes of the store's JSON file ``name`` (the manifest), refused before parsing if
    larger than ``max_bytes`` or nested deeper than a reader parses.

    Raises:
        FileNotFoundError: no such file.
        ManifestError: too large or too deeply nested.
        UnsafePathError: a link out of the store.
        StoreReadError: it exists but cannot be read.
    """
    path = join(root, name)
    refuse_links_out(fs, root, [path], name)
    if is_local(fs):
        raw = _read_local(path, max_bytes + 1)
    else:
        size = _remote_size(fs, path)
        if size is not None and size > max_bytes:
            raise ManifestError(
                f"{name} holds {size} bytes, more than the {max_bytes} a reader accepts"
            )
        raw = _remote.cat(fs, [path], {path: max_bytes + 1})[path]
    if isinstance(raw, FileNotFoundError):
        raise raw
    problem = json_problem(raw, max_bytes)
    if problem is not None:
        raise ManifestError(f"{name} {problem}")
    return raw


def read_json_files(
    fs: Any, root: str, names: Iterable[str], max_bytes: int = MAX_JSON_BYTES
) -> dict[str, bytes]:
    """The bytes of several small JSON files of the store (a writer's commit records), each
    refused like :func:`read_json`; remote ones are fetched together (one batch, no size
    request first: these are files a writer wrote, read back when it finalizes).

    Raises:
        FileNotFoundError: one is missing.
        ManifestError: one is too large, too deeply nested or of too many values.
        UnsafePathError: a link out of the store, or not a regular file.
        StoreReadError: one exists but cannot be read.
    """
    paths = {join(root, name): name for name in names}
    refuse_links_out(fs, root, paths, "store")
    if is_local(fs):
        got = {path: _read_local(path, max_bytes + 1) for path in paths}
    else:
        got = dict(_remote.cat(fs, paths, dict.fromkeys(paths, max_bytes + 1)))
    out = {}
    for path, name in paths.items():
        raw = got[path]
        if isinstance(raw, FileNotFoundError):
            raise raw
        problem = json_problem(raw, max_bytes)
        if problem is not None:
            raise ManifestError(f"{name} {problem}")
        out[name] = raw
    return out


def _remote_size(fs: Any, path: str) -> int | None:
    """The object's size from a metadata request; ``None`` when that fails or gives none (the
    read that follows then reports the failure, retried)."""
    try:
        size = fs.info(path).get("size")
    except Exception as exc:
        if _remote.is_missing(exc):
            raise FileNotFoundError(path) from None
        return None
    return size if isinstance(size, int) and not isinstance(size, bool) else None
