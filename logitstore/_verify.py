"""A store's shards checked against its manifest: the files of each shard read (presence, sizes,
SHA-256), and :meth:`LogitStore.verify`'s pass over every shard's bytes, values and ids."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from logitstore import format as fmt
from logitstore._doc_ids import IdLedger
from logitstore.document import shown_id
from logitstore.errors import CorruptShardError, LogitstoreError
from logitstore.storage import _fs

if TYPE_CHECKING:  # the reader imports this module
    from logitstore.reader import LogitStore


def fetch_verified(fs: Any, root: str, entry: Mapping[str, Any]) -> dict[str, bytes]:
    """The files of the shard ``entry`` describes, read from the store: each present and of the
    size the manifest says, all together of its SHA-256 (else ``CorruptShardError``)."""
    where = entry["path"]
    # Inside the root on every URL form, retried if remote (_fs.read_files).
    got = _fs.read_files(fs, root, dict(entry["files"]), f"shard {where}")
    files: dict[str, bytes] = {}
    for name, size in entry["files"]:
        data = got[name]
        if isinstance(data, BaseException):
            raise CorruptShardError(f"shard {where}: file {name} is missing")
        if len(data) != size:
            # (read up to one byte past the declared size: a longer file is not read whole)
            held = f"more than {size}" if len(data) > size else str(len(data))
            raise CorruptShardError(
                f"shard {where}: file {name} has {held} bytes, the manifest says {size}"
            )
        files[name] = bytes(data)
    digest = _fs.tree_checksum(files.items())
    if digest != entry["sha256"]:
        raise CorruptShardError(
            f"shard {where}: checksum mismatch (sha256 {digest[:16]}..., "
            f"the manifest says {entry['sha256'][:16]}...)"
        )
    return files


def verify(store: LogitStore, on_shard: Callable[[int], None] | None = None) -> list[str]:
    """What :meth:`LogitStore.verify` returns for ``store`` (see there)."""
    problems = []
    shards = store.manifest["shards"]
    stats = store.manifest["statistics"]
    for key, total in (
        ("documents", sum(s["documents"] for s in shards)),
        ("tokens", sum(s["tokens"] for s in shards)),
        ("bytes", sum(s["bytes"] for s in shards)),
    ):
        if stats.get(key) != total:
            problems.append(
                f"{fmt.MANIFEST_NAME}: statistics.{key} is {stats.get(key)!r}, "
                f"the shards add up to {total}"
            )
    ledger = IdLedger()  # ids held by more than one shard, reported at the end
    for j, entry in enumerate(shards):
        if sum(size for _, size in entry["files"]) != entry["bytes"]:
            problems.append(f"shard {entry['path']}: file sizes do not add up to its bytes")
        try:  # checksum, shapes and counts, then decoding, then every value
            arrays = store.read_shard_arrays(j)
            store.decode_shard(j, arrays, exhaustive=True)
        except LogitstoreError as exc:
            problems.append(str(exc))
            if on_shard is not None:
                on_shard(j)
            continue
        counts = Counter(arrays.doc_ids)
        twice = [d for d, n in counts.items() if n > 1]
        if twice:
            problems.append(
                f"shard {entry['path']}: document id {shown_id(twice[0])} appears {counts[twice[0]]} "
                f"times in it (repeated ids in this shard: {len(twice)}); an id names one "
                "document"
            )
        ledger.add(j, arrays.doc_ids)
        if on_shard is not None:
            on_shard(j)

    def doc_ids_of(j: int) -> list[str] | None:
        try:
            return store.read_shard_arrays(j).doc_ids
        except LogitstoreError:  # (read once already: it changed since, say a bucket's)
            return None

    for j, repeat in ledger.repeats(doc_ids_of).items():
        problems.append(
            f"shard {shards[j]['path']}: document id {shown_id(repeat.doc_id)} is held by shard "
            f"{shards[repeat.earlier_shard]['path']} too (ids of this shard held by earlier "
            f"shards: {repeat.count}); an id names one document"
        )
    return problems
