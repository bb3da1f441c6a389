"""Lossless conversion of a store between backends.

The codec's encoded arrays are copied as they are (never decoded and re-encoded), so every
decoded document of the output equals the input's bit for bit; converting back gives the
original store byte for byte.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from logitstore import format as fmt
from logitstore.reader import open_store
from logitstore.writer import EncodedDocument, StoreWriter


def convert_store(
    src: str,
    dst: str,
    *,
    backend: str,
    resume: bool = False,
    compression_level: int | None = None,
    storage_options: Mapping[str, Any] | None = None,
    dst_storage_options: Mapping[str, Any] | None = None,
    on_shard: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Copy store ``src`` to ``dst`` in ``backend``, shard by shard; ``dst`` is finalized last.

    Args:
        src: finalized source store.
        dst: new location (must be empty unless ``resume``).
        backend: output backend name.
        resume: continue an interrupted conversion into ``dst`` (skips committed shards).
        compression_level: zstd level; defaults to the source's.
        storage_options: fsspec options for ``src``.
        dst_storage_options: fsspec options for ``dst`` (default: ``storage_options``).
        on_shard: called with each shard index once it is committed or skipped (progress).

    Returns:
        The output manifest.
    """
    store = open_store(src, storage_options)
    manifest = store.manifest
    writer = StoreWriter(
        dst,
        codec=store.codec,
        backend=backend,
        metadata={key: manifest[key] for key in fmt.METADATA_KEYS},
        vocab_size=store.vocab_size,
        temperatures=fmt.tail_temperatures(manifest),
        mode="resume" if resume else "create",
        storage_options=storage_options if dst_storage_options is None else dst_storage_options,
        compression_level=int(
            manifest.get("compression_level", 9) if compression_level is None else compression_level
        ),
    )
    done = writer.committed_shards()
    for j, entry in enumerate(manifest["shards"]):
        if j not in done:
            arrays = store.read_shard_arrays(j)
            off, pos = arrays.offsets, arrays.position_offsets()
            docs = [
                EncodedDocument(
                    doc_id=doc_id,
                    input_ids=arrays.input_ids[off[d] : off[d + 1]],
                    loss_mask=arrays.loss_mask[pos[d] : pos[d + 1]],
                    fields={k: v[pos[d] : pos[d + 1]] for k, v in arrays.fields.items()},
                )
                for d, doc_id in enumerate(arrays.doc_ids)
            ]
            writer.write_shard(j, docs, fidelity=entry.get("fidelity"))
        if on_shard is not None:
            on_shard(j)
    return writer.finalize(store.num_shards)
