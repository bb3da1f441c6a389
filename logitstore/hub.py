"""Share a store on the Hugging Face Hub: a Hub-ready export with a dataset card, and push.

An export is two things in one folder:

* a **parquet-backend logit store** (``manifest.json`` + ``shards/*.parquet``, the encoded
  arrays copied losslessly as ``logitstore convert`` does), so ``open_store(OUT)`` and
  ``logitstore train --store hf://datasets/ORG/NAME`` read it like any other store;
* a **decoded view** (``data/*.parquet``) for people and the Hub's dataset viewer: the store's
  parquet columns are codec-encoded (id gap byte planes, quantisation codes relative to the
  top-1), which a person cannot read, so the view holds the decoded support ids and log-probs
  as plain lists. ``datasets.load_dataset(OUT)`` reads the view (the card's ``default``
  config); the ``encoded`` config names the store's own shards.

Layout::

    OUT/
      README.md              dataset card; YAML front matter: configs, dataset_info.features
      manifest.json          the store's manifest (parquet backend)
      shards/000000.parquet  encoded shards (what logitstore reads)
      data/000000.parquet    decoded view, one row per document, small row groups

Decoded view columns, one row per document of ``T`` tokens (``T - 1`` positions):
``doc_id`` (string), ``source_row`` and ``window`` (from the ``{row}/w{window}/{hash}`` doc id,
to join with the source text), ``input_ids`` (int32, ``T``), ``loss_mask`` (bool, ``T - 1``),
``support_ids`` (int32 ``(T - 1, K)``, most probable first, ``-1`` pads), ``support_logprobs``
(float32 ``(T - 1, K)``, ``-inf`` pads), ``tail_logmass``, ``label_logprob``, ``entropy``
(float32 ``T - 1``), and when present ``tail_logsumexp`` (float32 ``(T - 1, n_temps)``) and
``support_counts`` (int32 ``(T - 1, K)``, sampled codecs). The view is about ``8 K`` bytes per
position before compression, several times the store: ``max_support`` truncates the view's
support (the store itself stays complete), e.g. for ``dense`` stores.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from logitstore import format as fmt
from logitstore.errors import ConfigError, HubAuthError
from logitstore.reader import LogitStore, open_store
from logitstore.storage import _fs
from logitstore.storage.convert import convert_store

CARD_NAME = "README.md"
VIEW_DIR = "data"
VIEW_ROW_GROUP_BYTES = 32 << 20
"""Uncompressed bytes per row group of the view; the Hub's viewer reads row groups whole."""


# -- the decoded view ------------------------------------------------------------------------


def _lists(values: np.ndarray, offsets: np.ndarray) -> pa.Array:
    """``values (P, *s)`` cut into rows at ``offsets (D + 1,)``: list<fixed_size_list<...>>."""
    child: pa.Array = pa.array(np.ascontiguousarray(values).reshape(-1))
    for size in reversed(values.shape[1:]):
        child = pa.FixedSizeListArray.from_arrays(child, size)
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), child)


def _split_doc_id(doc_id: str) -> tuple[str, int]:
    """``"{row}/w{window}/{hash}"`` -> ``(row, window)``; other ids -> ``(doc_id, 0)``."""
    head, _, _digest = doc_id.rpartition("/")
    row, _, window = head.rpartition("/")
    if row and window.startswith("w") and window[1:].isdigit():
        return row, int(window[1:])
    return doc_id, 0


def _truncate(positions: Any, keep: int, temperatures: list[float]) -> dict[str, np.ndarray]:
    """The first ``keep`` support entries; dropped mass moves into the tail (float64)."""
    logp = positions.support_logprobs.astype(np.float64)
    dropped = logp[:, keep:]
    out = {
        "support_ids": positions.support_ids[:, :keep],
        "support_logprobs": positions.support_logprobs[:, :keep],
        "tail_logmass": np.logaddexp(
            positions.tail_logmass.astype(np.float64), _lse(dropped)
        ).astype(np.float32),
    }
    tls = positions.tail_logsumexp.astype(np.float64).copy()
    for j, tau in enumerate(temperatures[: tls.shape[1]]):
        tls[:, j] = np.logaddexp(tls[:, j], _lse(dropped / tau))
    out["tail_logsumexp"] = tls.astype(np.float32)
    if positions.support_counts is not None:
        out["support_counts"] = positions.support_counts[:, :keep]
    return out


def _lse(x: np.ndarray) -> np.ndarray:
    """Row-wise log-sum-exp that returns ``-inf`` for empty or all ``-inf`` rows."""
    if x.shape[1] == 0:
        return np.full(x.shape[0], -np.inf)
    top = np.max(x, axis=1, keepdims=True)
    safe = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        return (np.log(np.exp(x - safe).sum(axis=1)) + safe[:, 0]).astype(np.float64)


def view_table(store: LogitStore, j: int, max_support: int | None = None) -> pa.Table:
    """Shard ``j`` of ``store`` decoded into the view's columns (module docstring).

    Args:
        store: an opened store.
        j: shard index.
        max_support: keep at most this many support entries per position (``None``: all).

    Returns:
        One row per document.
    """
    arrays = store.read_shard_arrays(j)
    positions = store.decode_shard(j, arrays)
    temps = [float(t) for t in store.manifest["capture"].get("temperatures", [])]
    k = positions.support_ids.shape[1]
    cols: dict[str, np.ndarray] = {
        "support_ids": positions.support_ids,
        "support_logprobs": positions.support_logprobs,
        "tail_logmass": positions.tail_logmass,
        "tail_logsumexp": positions.tail_logsumexp,
    }
    if positions.support_counts is not None:
        cols["support_counts"] = positions.support_counts
    if max_support is not None and max_support < k:
        cols.update(_truncate(positions, max_support, temps))
    off, pos = arrays.offsets, arrays.position_offsets()
    split = [_split_doc_id(d) for d in arrays.doc_ids]
    columns: dict[str, pa.Array] = {
        "doc_id": pa.array(arrays.doc_ids, pa.string()),
        "source_row": pa.array([r for r, _ in split], pa.string()),
        "window": pa.array([w for _, w in split], pa.int32()),
        "input_ids": _lists(arrays.input_ids.astype(np.int32), off),
        "loss_mask": _lists(arrays.loss_mask, pos),
        "support_ids": _lists(cols["support_ids"].astype(np.int32), pos),
        "support_logprobs": _lists(cols["support_logprobs"].astype(np.float32), pos),
        "tail_logmass": _lists(cols["tail_logmass"].astype(np.float32), pos),
        "label_logprob": _lists(positions.label_logprob.astype(np.float32), pos),
        "entropy": _lists(positions.entropy.astype(np.float32), pos),
    }
    if cols["tail_logsumexp"].shape[1]:
        columns["tail_logsumexp"] = _lists(cols["tail_logsumexp"].astype(np.float32), pos)
    if "support_counts" in cols:
        columns["support_counts"] = _lists(cols["support_counts"].astype(np.int32), pos)
    return pa.table(columns)


def _write_view(fs: Any, path: str, table: pa.Table, compression_level: int) -> None:
    """Write ``table`` as one parquet file with row groups of about ``VIEW_ROW_GROUP_BYTES``."""
    lengths = pc.list_value_length(table.column("loss_mask")).to_numpy()
    per_position = max(table.nbytes / max(int(lengths.sum()), 1), 1.0)
    sink = pa.BufferOutputStream()
    with pq.ParquetWriter(
        sink, table.schema, compression="zstd", compression_level=compression_level
    ) as writer:
        start, size = 0, 0.0
        for d, n in enumerate(lengths):
            size += (int(n) + 1) * per_position
            if size >= VIEW_ROW_GROUP_BYTES or d == len(lengths) - 1:
                writer.write_table(table.slice(start, d + 1 - start))
                start, size = d + 1, 0.0
    _fs.write_bytes_atomic(fs, path, sink.getvalue().to_pybytes())


# -- export ----------------------------------------------------------------------------------


def export_store(
    store: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    max_support: int | None = None,
    repo_id: str | None = None,
    compression_level: int | None = None,
    storage_options: Mapping[str, Any] | None = None,
    out_storage_options: Mapping[str, Any] | None = None,
    on_shard: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Write a Hub-ready folder: a parquet store, its decoded view and a dataset card.

    ``out`` is written in this order: the store (its manifest last, by the writer), the view
    files, then ``README.md``; a folder without ``README.md`` is an unfinished export.

    Args:
        store: source store (any backend, any fsspec URL).
        out: new, empty location.
        max_support: truncate the view's support to this many entries (``None``: all).
        repo_id: ``ORG/NAME`` the card's examples use (default: a placeholder).
        compression_level: zstd level (default: the source's).
        storage_options: fsspec options of ``store``.
        out_storage_options: fsspec options of ``out`` (default: ``storage_options``).
        on_shard: called with each shard index once its view is written (progress).

    Returns:
        The exported store's manifest.

    Raises:
        ConfigError: ``max_support < 1``.
        StoreExistsError: ``out`` is not empty.
    """
    if max_support is not None and max_support < 1:
        raise ConfigError(f"max_support must be >= 1 or None, found {max_support}")
    out_opts = storage_options if out_storage_options is None else out_storage_options
    manifest = convert_store(
        str(store),
        str(out),
        backend="parquet",
        compression_level=compression_level,
        storage_options=storage_options,
        dst_storage_options=out_opts,
    )
    exported = open_store(out, out_opts)
    fs, root = exported.fs, exported.root
    # The writer's bookkeeping is not part of a published store; the reader never needs it.
    _fs.remove(fs, _fs.join(root, fmt.RECORDS_DIR))
    _fs.remove(fs, _fs.join(root, fmt.SETTINGS_NAME))
    level = int(manifest.get("compression_level", 9))
    schema, view_bytes = None, 0
    for j in range(exported.num_shards):
        table = view_table(exported, j, max_support)
        schema, view_bytes = table.schema, view_bytes + table.nbytes
        _write_view(fs, _fs.join(root, f"{VIEW_DIR}/{j:06d}.parquet"), table, level)
        if on_shard is not None:
            on_shard(j)
    assert schema is not None  # a finalized store has at least one shard
    card = dataset_card(
        manifest, schema, repo_id=repo_id, max_support=max_support, num_bytes=view_bytes
    )
    _fs.write_bytes_atomic(fs, _fs.join(root, CARD_NAME), card.encode())
    return manifest


def is_export(path: str | os.PathLike[str]) -> bool:
    """Whether local ``path`` is a finished export (card, manifest and view present)."""
    p = Path(path)
    return (
        (p / CARD_NAME).is_file() and (p / fmt.MANIFEST_NAME).is_file() and (p / VIEW_DIR).is_dir()
    )


# -- the dataset card ------------------------------------------------------------------------


def _features_yaml(schema: pa.Schema) -> list[dict[str, Any]]:
    import datasets

    info = datasets.DatasetInfo(features=datasets.Features.from_arrow_schema(schema))
    return list(info._to_yaml_dict()["features"])


def _front_matter(manifest: Mapping[str, Any], schema: pa.Schema, num_bytes: int) -> str:
    import yaml

    documents = int(manifest["statistics"]["documents"])
    meta = {
        "configs": [
            {
                "config_name": "default",
                "data_files": [{"split": "train", "path": f"{VIEW_DIR}/*.parquet"}],
                "default": True,
            },
            {
                "config_name": "encoded",
                "data_files": [{"split": "train", "path": f"{fmt.SHARDS_DIR}/*.parquet"}],
            },
        ],
        "dataset_info": [
            {
                "config_name": "default",
                "features": _features_yaml(schema),
                "splits": [{"name": "train", "num_bytes": num_bytes, "num_examples": documents}],
                "dataset_size": num_bytes,
            }
        ],
        "tags": ["knowledge-distillation", "teacher-logits", "logitstore"],
    }
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, width=100) + "---\n"


def _row(key: str, value: Any) -> str:
    return f"| {key} | {value} |"


def dataset_card(
    manifest: Mapping[str, Any],
    schema: pa.Schema,
    *,
    repo_id: str | None = None,
    max_support: int | None = None,
    num_bytes: int = 0,
) -> str:
    """The export's ``README.md``: YAML front matter (configs, features) and a description.

    Args:
        manifest: the exported store's manifest.
        schema: the decoded view's Arrow schema (for ``dataset_info.features``).
        repo_id: ``ORG/NAME`` for the examples; a placeholder when ``None``.
        max_support: the view's support truncation, if any (stated in the card).
        num_bytes: the view's size in memory (Arrow bytes), for ``dataset_info.splits``.

    Returns:
        The card's text.
    """
    repo = repo_id or "ORG/NAME"
    stats = manifest["statistics"]
    teacher, tokenizer = manifest["teacher"], manifest["tokenizer"]
    codec = manifest["codec"]
    params = ", ".join(f"{k}={v}" for k, v in sorted(codec.get("configuration", {}).items()))
    model = teacher.get("model") or teacher.get("id") or teacher.get("name") or "unknown"
    rows = [
        _row("teacher", ", ".join(f"`{k}={v}`" for k, v in sorted(teacher.items()))),
        _row(
            "tokenizer",
            ", ".join(
                f"`{k}={v}`"
                for k, v in sorted(tokenizer.items())
                if not isinstance(v, (dict, list))
            ),
        ),
        _row("vocabulary", manifest["vocab_size"]),
        _row("codec", f"`{codec['name']}` v{codec['version']} ({params})"),
        _row("capture", ", ".join(f"`{k}={v}`" for k, v in sorted(manifest["capture"].items()))),
        _row("documents", stats["documents"]),
        _row("tokens", stats["tokens"]),
        _row("shards", len(manifest["shards"])),
        _row("store bytes", stats["bytes"]),
        _row("bytes/token", f"{stats['bytes_per_token']:.2f}"),
    ]
    fidelity = stats.get("fidelity") or {}
    rows += [_row(f"fidelity: {k}", f"{v:.6g}") for k, v in sorted(fidelity.items())]
    if not fidelity:
        rows.append(_row("fidelity", "not measured at capture"))
    mixture = teacher.get("mixture")
    note = ""
    if isinstance(mixture, dict):
        note = (
            "\n## Mixture of teachers\n\n"
            f"{mixture.get('approximation', '')}\n\nWeights: `{mixture.get('weights')}`; "
            f"teachers: `{[t.get('teacher', {}).get('model') for t in mixture.get('stores', [])]}`.\n"
        )
    view_support = (
        f"the {max_support} most probable entries (the rest folded into `tail_logmass`)"
        if max_support
        else "the full stored support"
    )
    body = f"""
# Teacher logits of `{model}`

A cache of a teacher's next-token distributions for offline knowledge distillation, written
by logitstore (format version {manifest["format_version"]}). Precompute once, train many
students: the teacher never runs again.

| | |
|---|---|
{chr(10).join(rows)}

Fidelity is measured at capture time against the dense teacher on sampled positions
(`mass_captured`: teacher mass inside the stored support; `bucket_kl`: KL from the true to the
stored distribution on the bucket model; `top1_agreement`: stored argmax equals the true one).
{note}
## Train a student from it (one command)

```bash
logitstore train --store hf://datasets/{repo} --student STUDENT --divergence fkl --out run/
```

The student must use the teacher's tokenizer (checked against `tokenizer` above).

## Files

- `manifest.json`, `shards/*.parquet`: the logit store itself (parquet backend, codec-encoded
  columns, lossless). `logitstore.open_store("hf://datasets/{repo}")` streams it shard by
  shard; `logitstore verify` checks every checksum.
- `data/*.parquet`: a decoded, human-readable view, one row per document: `doc_id`,
  `source_row` and `window` (join with the source text by `source_row`), `input_ids`,
  `loss_mask`, `support_ids` and `support_logprobs` ({view_support}, most probable first,
  padding `-1` / `-inf`), `tail_logmass` (log of the teacher mass outside the support),
  `label_logprob`, `entropy`. Position `t` predicts `input_ids[t + 1]`.

```python
from datasets import load_dataset
rows = load_dataset("{repo}", split="train")           # the decoded view
from logitstore import open_store
store = open_store("hf://datasets/{repo}")             # the store
```
"""
    return _front_matter(manifest, schema, num_bytes) + body


# -- push ------------------------------------------------------------------------------------


def push_store(
    store: str | os.PathLike[str],
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    max_support: int | None = None,
    storage_options: Mapping[str, Any] | None = None,
    commit_message: str | None = None,
) -> str:
    """Upload a store to the Hub as a dataset repository (exporting it first if needed).

    A local folder that already is an export (see :func:`is_export`) is uploaded as it is;
    any other store is exported into a temporary folder first.

    Args:
        store: an export folder, or any store URL.
        repo_id: ``ORG/NAME`` of the dataset repository (created if missing).
        private: create the repository private.
        revision: branch to upload to (created if missing); default the main branch.
        token: Hub token; default ``huggingface_hub.get_token()`` (``HF_TOKEN``, or the
            token saved by ``hf auth login``).
        max_support: view truncation when exporting (see :func:`export_store`).
        storage_options: fsspec options of ``store``.
        commit_message: default ``"Upload logit store"``.

    Returns:
        The URL of the commit.

    Raises:
        HubAuthError: no token given or found.
    """
    import huggingface_hub

    token = token or huggingface_hub.get_token()
    if not token:
        raise HubAuthError(
            "pushing needs a Hugging Face token with write access; found none (set HF_TOKEN "
            "or run `hf auth login`)"
        )
    with tempfile.TemporaryDirectory(prefix="logitstore-export-") as tmp:
        folder = str(store)
        if not (_fs.is_local(_fs.url_to_fs(folder)[0]) and is_export(folder)):
            folder = os.path.join(tmp, "export")
            export_store(
                store,
                folder,
                max_support=max_support,
                repo_id=repo_id,
                storage_options=storage_options,
                out_storage_options={},
            )
        api = huggingface_hub.HfApi(token=token)
        api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        if revision is not None:
            api.create_branch(repo_id, repo_type="dataset", branch=revision, exist_ok=True)
        info = api.upload_folder(
            repo_id=repo_id,
            repo_type="dataset",
            folder_path=folder,
            revision=revision,
            commit_message=commit_message or "Upload logit store",
        )
    return str(getattr(info, "commit_url", info))
