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
import re
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from logitstore import format as fmt
from logitstore._hub_card import VIEW_DIR, dataset_card
from logitstore.errors import ConfigError, HubAuthError
from logitstore.reader import LogitStore, open_store
from logitstore.storage import _fs
from logitstore.storage._remote import describe, printable
from logitstore.storage.convert import convert_store

CARD_NAME = "README.md"
VIEW_ROW_GROUP_BYTES = 32 << 20
"""Uncompressed bytes per row group of the view; the Hub's viewer reads row groups whole."""


# -- the decoded view ------------------------------------------------------------------------


def _lists(values: np.ndarray, offsets: np.ndarray) -> pa.Array:
    """``values (P, *s)`` cut into rows at ``offsets (D + 1,)``: list<fixed_size_list<...>>."""
    child: pa.Array = pa.array(np.ascontiguousarray(values).reshape(-1))
    for size in reversed(values.shape[1:]):
        child = pa.FixedSizeListArray.from_arrays(child, size)
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), child)


_WINDOW = re.compile(r"w[0-9]{1,9}")
"""A window part of a document id: ASCII digits that fit the view's int32 ``window`` column
(``str.isdigit`` also takes ``"²"``, which ``int`` refuses)."""


def _split_doc_id(doc_id: str) -> tuple[str, int]:
    """``"{row}/w{window}/{hash}"`` -> ``(row, window)``; other ids -> ``(doc_id, 0)``."""
    head, _, _digest = doc_id.rpartition("/")
    row, _, window = head.rpartition("/")
    if row and _WINDOW.fullmatch(window):
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
    temps = fmt.tail_temperatures(store.manifest) or []
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


_LICENSE_ID = re.compile(r"[a-z0-9][a-z0-9.+-]*")


def check_license(license: str | None) -> None:
    """Refuse a license that is not shaped like a Hub license identifier (None passes)."""
    if license is not None and not _LICENSE_ID.fullmatch(str(license)):
        raise ConfigError(
            "license must be a Hub license identifier such as apache-2.0, mit, cc-by-4.0 or "
            f"other; found {license!r}"
        )


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
    license: str | None = None,
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
        license: the card's license, a Hub license identifier (``apache-2.0``, ``mit``,
            ``cc-by-4.0``, ``other``, ...); without one, :func:`push_store` asks for it.

    Returns:
        The exported store's manifest.

    Raises:
        ConfigError: ``max_support < 1``, or a malformed license identifier.
        StoreExistsError: ``out`` is not empty.
    """
    if max_support is not None and max_support < 1:
        raise ConfigError(f"max_support must be >= 1 or None, found {max_support}")
    check_license(license)
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
        manifest,
        schema,
        repo_id=repo_id,
        max_support=max_support,
        num_bytes=view_bytes,
        license=license,
    )
    _fs.write_bytes_atomic(fs, _fs.join(root, CARD_NAME), str(card).encode())
    return manifest


def is_export(path: str | os.PathLike[str]) -> bool:
    """Whether local ``path`` is a finished export (card, manifest and view present)."""
    p = Path(path)
    return (
        (p / CARD_NAME).is_file() and (p / fmt.MANIFEST_NAME).is_file() and (p / VIEW_DIR).is_dir()
    )


# -- push ------------------------------------------------------------------------------------


def check_links(folder: str) -> None:
    """Refuse a local export holding a link that resolves outside it, or a file that is not a
    regular file: the upload reads every file it lists through its links, so a link to
    ``~/.ssh/id_rsa`` would publish the key, and a FIFO would block it.

    Raises:
        UnsafePathError: naming the path inside ``folder``.
    """
    fs, root = _fs.url_to_fs(folder)
    paths = []
    for parent, folders, files in os.walk(root):  # (links to folders are listed, not entered)
        paths += [os.path.join(parent, name) for name in (*folders, *files)]
    _fs.refuse_links_out(fs, root, paths, f"export {folder}")


def _load_card(folder: str) -> Any:
    """An export's ``huggingface_hub.DatasetCard``, parsed; it may be a stranger's (an export
    downloaded to be re-published).

    Raises:
        ConfigError: not UTF-8 text with valid YAML metadata (too deeply nested, malformed).
    """
    import yaml
    from huggingface_hub import DatasetCard

    path = Path(folder) / CARD_NAME
    try:
        return DatasetCard.load(path)
    except (UnicodeDecodeError, yaml.YAMLError, ValueError, TypeError, RecursionError) as exc:
        raise ConfigError(
            f"{path} must be a dataset card (UTF-8 Markdown with YAML metadata); found one "
            f"that cannot be parsed ({describe(exc)})"
        ) from None


def _card_license(folder: str) -> str | None:
    """The license in an export's card, or None.

    Raises:
        ConfigError: the card cannot be parsed, or its license is not a Hub license identifier.
    """
    license = _load_card(folder).data.license
    if not license:
        return None
    if not isinstance(license, str) or not _LICENSE_ID.fullmatch(license):
        raise ConfigError(
            f"{Path(folder) / CARD_NAME}: expected its license to be one Hub license identifier "
            f"(apache-2.0, mit, cc-by-4.0, other, ...); found {printable(repr(license))[:200]}"
        )
    return license


def _set_card_license(folder: str, license: str) -> None:
    """Write ``license`` into an export's card, keeping the rest of the card."""
    path = Path(folder) / CARD_NAME
    card = _load_card(folder)
    if card.data.license != license:
        card.data.license = license
        card.save(path)


def upload_resumable(
    api: Any, repo_id: str, folder: str, revision: str | None, commit_message: str | None = None
) -> str:
    """Upload ``folder`` to the dataset ``repo_id`` so that an interrupted upload resumes.

    ``huggingface_hub`` before 2.0 offers this as ``HfApi.upload_large_folder`` (many commits,
    resume state kept in ``folder/.cache/huggingface``; it takes no commit message). From 2.0
    on that method is gone and ``upload_folder`` itself uploads in several commits and resumes
    when run again (with ``hf_xet``, a dependency of ``huggingface_hub``). Either way, running
    the same push again skips what the Hub already holds.

    Returns:
        The URL of the last commit, or of the revision's file tree.
    """
    tree = f"{getattr(api, 'endpoint', 'https://huggingface.co')}/datasets/{repo_id}/tree/"
    tree += revision or "main"
    large = getattr(api, "upload_large_folder", None)
    if large is not None:
        large(repo_id=repo_id, folder_path=folder, repo_type="dataset", revision=revision)
        return tree
    info = api.upload_folder(
        repo_id=repo_id,
        repo_type="dataset",
        folder_path=folder,
        revision=revision,
        commit_message=commit_message or "Upload logit store",
    )
    return str(getattr(info, "commit_url", None) or tree)


def push_store(
    store: str | os.PathLike[str],
    repo_id: str,
    *,
    license: str | None = None,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    max_support: int | None = None,
    storage_options: Mapping[str, Any] | None = None,
    on_status: Callable[[str], None] | None = None,
    commit_message: str | None = None,
) -> str:
    """Upload a store to the Hub as a dataset repository (exporting it first if needed).

    A local folder that already is an export (see :func:`is_export`) is uploaded as it is
    (its card gets ``license`` if one is given); any other store is exported into a temporary
    folder first. The upload is resumable (:func:`upload_resumable`): for a big store, export
    it once and push the export folder; if the upload is interrupted, the same push continues.

    Args:
        store: an export folder, or any store URL.
        repo_id: ``ORG/NAME`` of the dataset repository (created if missing).
        license: the card's license, a Hub license identifier (``apache-2.0``, ``mit``,
            ``cc-by-4.0``, ``other``, ...); may be omitted only for an export whose card has one.
        private: create the repository private.
        revision: branch to upload to (created if missing); default the main branch.
        token: Hub token; default ``huggingface_hub.get_token()`` (``HF_TOKEN``, or the
            token saved by ``hf auth login``).
        max_support: view truncation when exporting (see :func:`export_store`).
        storage_options: fsspec options of ``store``.
        on_status: called with a line of progress before each stage (export, upload).
        commit_message: default ``"Upload logit store"`` (``upload_large_folder``, used with
            ``huggingface_hub`` before 2.0, names its commits itself).

    Returns:
        The URL of the (last) commit, or of the revision's file tree.

    Raises:
        ConfigError: no license given or found in the export's card, or a malformed one.
        HubAuthError: no token given or found.
    """
    import huggingface_hub

    say = on_status or (lambda _line: None)
    check_license(license)
    folder = str(store)
    ready = _fs.is_local(_fs.url_to_fs(folder)[0]) and is_export(folder)
    if ready:
        check_links(folder)  # uploaded as it is
    license = license or (_card_license(folder) if ready else None)
    if license is None:
        raise ConfigError(
            "pushing needs a license for the dataset card; found none: pass --license "
            "(a Hub license identifier such as apache-2.0, mit, cc-by-4.0 or other)"
        )
    token = token or huggingface_hub.get_token()
    if not token:
        raise HubAuthError(
            "pushing needs a Hugging Face token with write access; found none (set HF_TOKEN "
            "or run `hf auth login`)"
        )
    with tempfile.TemporaryDirectory(prefix="logitstore-export-") as tmp:
        if ready:
            _set_card_license(folder, license)
        else:
            folder = os.path.join(tmp, "export")
            say(f"exporting {store} into a temporary folder")
            export_store(
                store,
                folder,
                max_support=max_support,
                repo_id=repo_id,
                storage_options=storage_options,
                out_storage_options={},
                license=license,
            )
        api = huggingface_hub.HfApi(token=token)
        api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        if revision is not None:
            api.create_branch(repo_id, repo_type="dataset", branch=revision, exist_ok=True)
        say(
            f"uploading to hf://datasets/{repo_id} in resumable batches; if interrupted, run "
            "the same push again to continue"
        )
        return upload_resumable(api, repo_id, folder, revision, commit_message)
