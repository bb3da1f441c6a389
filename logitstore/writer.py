"""The store writer: commits whole shards atomically, assembles the manifest last.

The writer only serialises and returns counts; the pipeline owns the shard policy (which
documents go in which shard index, progress, resume). Commit protocol for shard ``i``:

1. create ``claims/<i>.claim`` exclusively (two writers never own one shard);
2. encode the shard in memory and write its files (locally under a temporary name, then
   rename; on object stores in place, since a PUT is atomic per object);
3. write ``records/<i>.json`` with counts, bytes and SHA-256 (this is the commit point);
4. delete the claim.

A failure at any step removes what this call wrote and releases the claim. ``finalize``
reads the records and writes ``manifest.json`` atomically, only when every shard is committed.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from logitstore import _owners
from logitstore import format as fmt
from logitstore._writer_documents import EncodedDocument, check_document, concatenate, field_specs
from logitstore.codecs.base import Codec, FieldSpec
from logitstore.errors import (
    ConfigError,
    CorruptShardError,
    DataError,
    LogitstoreError,
    OutputNotWritableError,
    SettingsMismatchError,
    ShardClaimError,
    StoreExistsError,
    StoreNotFoundError,
)
from logitstore.storage import _fs
from logitstore.storage import get_backend as _get_backend
from logitstore.storage.base import RESERVED_NAMES, ShardArrays, position_bytes, token_dtype

MODES = ("create", "resume", "join")


class StoreWriter:
    """Writes shards of one store; several writers (ranks) may share a store.

    Args:
        url: local path or fsspec URL of the store root.
        codec: the codec every shard uses.
        backend: ``"zarr"`` or ``"parquet"`` (see ``logitstore.storage.BACKENDS``).
        metadata: ``{"teacher", "tokenizer", "capture", "source"}`` sections (plain JSON),
            copied into the manifest.
        vocab_size: the teacher's true vocabulary size.
        temperatures: the extra capture temperatures, one per ``tail_logsumexp`` column of
            every document (the manifest's ``tail_temperatures``); ``None`` reads them from
            ``metadata["capture"]["temperatures"]`` (format 1's place), else none.
        mode: ``"create"`` (location must be empty), ``"resume"`` (create if empty, else the
            stored settings must match; stale claims and temporary files of a crashed run are
            removed), ``"join"`` (another process created or resumed the store; settings
            must match). Only one process may open a store with ``"resume"`` at a time.
        storage_options: passed to fsspec.
        compression_level: zstd level for every array.

    Raises:
        StoreExistsError: ``create`` on a non-empty location.
        StoreNotFoundError: ``join`` with no store there.
        SettingsMismatchError: the stored settings differ (names the first differing key).
        ConfigError: invalid arguments or metadata.
    """

    def __init__(
        self,
        url: str | os.PathLike[str],
        *,
        codec: Codec,
        backend: str = "zarr",
        metadata: Mapping[str, Any],
        vocab_size: int,
        temperatures: Sequence[float] | None = None,
        mode: str = "create",
        storage_options: Mapping[str, Any] | None = None,
        compression_level: int = 9,
    ) -> None:
        if mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, found {mode!r}")
        if not isinstance(compression_level, int) or not -7 <= compression_level <= 22:
            raise ConfigError(
                f"compression_level must be an int in [-7, 22], found {compression_level!r}"
            )
        self.url = str(url)
        self.fs, self.root = _fs.url_to_fs(self.url, storage_options)
        self.codec = codec
        self.backend = _get_backend(backend)
        self.vocab_size = int(vocab_size)
        self.compression_level = compression_level
        settings = fmt.build_settings(
            codec_json=codec.to_json(),
            backend=backend,
            vocab_size=vocab_size,
            metadata=metadata,
            temperatures=temperatures,
        )
        settings["compression_level"] = compression_level
        self.settings = settings
        # The manifest names the tail_logsumexp columns by this list: documents must match it.
        self.temperatures: list[float] = settings["tail_temperatures"]
        with _writing(f"open the store at {self.url}"):
            {"create": self._create, "resume": self._resume, "join": self._join}[mode]()
            # Who writes this store, until close() or finalize(): a resume elsewhere on this
            # host refuses to start while this process lives (see _refuse_live_writers).
            self._owner_file = _owners.writer_file(self._path(fmt.CLAIMS_DIR))
            _fs.write_bytes_atomic(self.fs, self._owner_file, _owners.owner().encode())

    def close(self) -> None:
        """Say that this process writes no more (``finalize`` says it for every writer)."""
        with _writing(f"close the store at {self.url}"):
            _fs.remove(self.fs, self._owner_file)

    # -- opening ---------------------------------------------------------------------------

    def _path(self, rel: str) -> str:
        return _fs.join(self.root, rel)

    def _contents(self) -> list[str]:
        if not self.fs.exists(self.root):
            return []
        if not self.fs.isdir(self.root):
            raise StoreExistsError(f"{self.url} is a file, expected an empty or new directory")
        return _fs.list_names(self.fs, self.root)

    def _create(self) -> None:
        found = self._contents()
        if found:
            raise StoreExistsError(
                f"{self.url} is not empty (holds {', '.join(found[:5])}"
                f"{', ...' if len(found) > 5 else ''}); use an empty location, or resume (mode='resume', --resume)"
            )
        self.fs.makedirs(self.root, exist_ok=True)
        if not _fs.create_exclusive(
            self.fs, self._path(fmt.SETTINGS_NAME), fmt.dumps(self.settings)
        ):
            raise StoreExistsError(f"another writer created a store at {self.url} concurrently")

    def _stored_settings(self) -> dict[str, Any] | None:
        return _read_settings(self.fs, self.root, self.url)

    def _check_settings(self, stored: Mapping[str, Any]) -> None:
        version = stored.get("format_version")
        if version != self.settings.get("format_version"):
            raise SettingsMismatchError(
                f"{self.url} was started by a writer of format {version}; this version writes "
                f"format {fmt.FORMAT_VERSION} and cannot continue it. Write a new store "
                "(a finished older store still reads, and `logitstore convert` rewrites it in "
                "this format)"
            )
        diff = fmt.first_difference(stored, self.settings)
        if diff:
            key, old, new = diff
            raise SettingsMismatchError(
                f"{self.url} was created with different settings: {key} is {old!r} in the "
                f"store but {new!r} in this run"
            )

    def _resume(self) -> None:
        stored = self._stored_settings()
        if stored is None:
            if self.fs.isdir(self.root):  # a run killed while creating settings.json
                self._remove_temporaries()
            self._create()
            return
        self._check_settings(stored)
        self._refuse_live_writers()
        # Resume starts a new run: claims and temporaries left by a crashed one are stale.
        _fs.remove(self.fs, self._path(fmt.CLAIMS_DIR))
        self._remove_temporaries()

    def _refuse_live_writers(self) -> None:
        """Refuse to resume a store that a process of this host still writes: resuming removes
        the claims and temporary files of the run it continues, which would pull them from
        under a live one (see :mod:`logitstore._owners`)."""
        live = _owners.live_writers(self.fs, self._path(fmt.CLAIMS_DIR))
        if live:
            name, pid = live[0]
            raise ShardClaimError(
                f"{self.url} is being written by pid {pid} on this host ({fmt.CLAIMS_DIR}/"
                f"{name}); let that run finish or stop it, then resume"
            )

    def _join(self) -> None:
        stored = self._stored_settings()
        if stored is None:
            raise StoreNotFoundError(
                f"no store to join at {self.url} (no {fmt.SETTINGS_NAME}); the first process "
                "must open it with mode='create' or 'resume'"
            )
        self._check_settings(stored)

    def _remove_temporaries(self) -> None:
        for folder in ("", fmt.SHARDS_DIR, fmt.RECORDS_DIR):
            base = self._path(folder) if folder else self.root
            for name in _fs.list_names(self.fs, base):
                if name.startswith(_fs.TMP_PREFIX):
                    _fs.remove(self.fs, f"{base}/{name}")

    # -- writing ---------------------------------------------------------------------------

    def committed_shards(self) -> set[int]:
        """Indices of shards whose record exists (committed by any writer)."""
        self.fs.invalidate_cache()  # other writers commit meanwhile; never trust a cached listing
        names = _fs.list_names(self.fs, self._path(fmt.RECORDS_DIR))
        return {i for i in map(fmt.record_index, names) if i is not None}

    def write_shard(
        self,
        index: int,
        documents: Sequence[EncodedDocument],
        fidelity: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Encode and commit shard ``index`` atomically.

        Args:
            index: shard index (>= 0); the shard's name derives from it.
            documents: at least one document.
            fidelity: fidelity sums of this shard's sampled positions
                (``logitstore.codecs.fidelity_sums``), or ``None``.

        Returns:
            The shard record: ``index``, ``path``, ``documents``, ``tokens``, ``positions``,
            ``bytes``, ``sha256``, ``files`` (``[path, size]`` pairs), ``num_temperatures``,
            ``fidelity``.

        Raises:
            ShardClaimError: the shard is committed already or another writer holds it.
            DataError: documents that do not fit the codec, vocabulary or each other, or a
                document id given twice.
        """
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
            raise ConfigError(f"shard index must be an int >= 0, found {index!r}")
        index = int(index)
        if not documents:
            raise DataError(f"shard {index}: a shard needs at least one document")
        n_temps, specs = field_specs(documents[0], self.codec, self.vocab_size, self.temperatures)
        clash = RESERVED_NAMES & set(specs)
        if clash:
            raise ConfigError(f"codec fields {sorted(clash)} clash with reserved names")
        seen: set[str] = set()
        for doc in documents:
            check_document(doc, specs, self.vocab_size)
            if doc.doc_id in seen:
                raise DataError(f"shard {index}: document id {doc.doc_id!r} appears twice")
            seen.add(doc.doc_id)
        arrays = concatenate(documents, specs)
        rel = fmt.shard_name(index, self.backend.suffix)
        record_path = self._path(fmt.record_name(index))
        with _writing(f"claim shard {index} of {self.url}"):
            claim = self._claim(index, record_path)
        committed = False
        final = self._path(rel)
        try:
            files = self._encode(rel, arrays, specs, n_temps)
            record = {
                "index": index,
                "path": rel,
                "documents": arrays.num_documents,
                "tokens": arrays.num_tokens,
                "positions": arrays.num_positions,
                "bytes": sum(len(b) for b in files.values()),
                "sha256": _fs.tree_checksum(files.items()),
                "files": [[name, len(data)] for name, data in sorted(files.items())],
                "num_temperatures": n_temps,
                "fidelity": None if fidelity is None else dict(fidelity),
            }
            record_bytes = fmt.dumps(record)
            # Leftovers of a crashed attempt have no record, so they were never committed.
            with _writing(f"write shard {index} of {self.url}"):
                _fs.remove(self.fs, final)
                self._write_files(final, files)
                _fs.write_bytes_atomic(self.fs, record_path, record_bytes)
            committed = True
        finally:
            if not committed:
                _fs.remove(self.fs, final)
            _fs.remove(self.fs, claim)
        return fmt.normalize(record)

    def _encode(
        self, rel: str, arrays: ShardArrays, specs: Mapping[str, FieldSpec], n_temps: int
    ) -> dict[str, bytes]:
        """The shard's files, compressed unless that would make readers refuse the shard.

        Readers bound a shard's arrays, uncompressed and decoded, by a multiple of its bytes
        on disk (``format.expansion_problem``); data that compresses further than that (one
        text repeated at length, say) is stored uncompressed, so every shard written reads.
        """
        decoded = self.codec.decoded_bytes(self.vocab_size, n_temps)
        row, token_bytes = position_bytes(specs), token_dtype(self.vocab_size).itemsize

        def encoded(level: int | None) -> tuple[dict[str, bytes], str | None]:
            files = self.backend.encode(
                rel, arrays, specs, vocab_size=self.vocab_size, compression_level=level
            )
            counts = {
                "positions": arrays.num_positions,
                "tokens": arrays.num_tokens,
                "documents": arrays.num_documents,
                "files": [(name, len(data)) for name, data in files.items()],
            }
            return files, fmt.expansion_problem(counts, row, decoded, token_bytes)

        files, problem = encoded(self.compression_level)
        if problem is None:
            return files
        warnings.warn(
            f"{rel} compresses too well for readers to accept it ({problem}); it is stored "
            "uncompressed (data this repetitive is better deduplicated)",
            stacklevel=3,
        )
        files, problem = encoded(None)
        if problem is not None:  # not seen: uncompressed, a shard decodes to < 20x its bytes
            raise DataError(f"{rel}: readers would refuse this shard even uncompressed ({problem})")
        return files

    def _claim(self, index: int, record_path: str) -> str:
        """Create shard ``index``'s claim file exclusively; returns its path."""
        if self.fs.exists(record_path):
            raise ShardClaimError(f"shard {index} is already committed ({fmt.record_name(index)})")
        claim = self._path(fmt.claim_name(index))
        owner = _owners.owner().encode()
        if not _fs.create_exclusive(self.fs, claim, owner):
            try:
                holder = _fs.read_bytes(self.fs, claim).decode(errors="replace").strip()
            except FileNotFoundError:
                holder = "released meanwhile"
            raise ShardClaimError(
                f"shard {index} is claimed by another writer ({holder}); each shard index "
                "must belong to exactly one writer"
            )
        if self.fs.exists(record_path):  # committed and released between our check and claim
            _fs.remove(self.fs, claim)
            raise ShardClaimError(f"shard {index} is already committed ({fmt.record_name(index)})")
        return claim

    def _write_files(self, final: str, files: Mapping[str, bytes]) -> None:
        """Write the shard's files so that ``final`` appears whole (locally) or not at all."""
        if not _fs.is_local(self.fs):
            _fs.write_tree(self.fs, self.root, files)  # each object PUT is atomic
            return
        tmp = _fs.temp_name(final)
        try:
            _fs.write_tree(
                self.fs, self.root, {_swap(n, final, tmp, self.root): b for n, b in files.items()}
            )
            _fs.rename(self.fs, tmp, final)
        finally:
            _fs.remove(self.fs, tmp)

    # -- finishing ---------------------------------------------------------------------------

    def finalize(self, num_shards: int, run: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Assemble and atomically write the manifest from the records of shards ``0..N-1``.

        ``run`` is information on how the store was written (the manifest's ``run``), e.g. the
        teacher's placement; stores that differ only there hold the same data.

        Returns:
            The manifest.

        Raises:
            CorruptShardError: a shard is not committed, or its files are missing or of the
                wrong size.
            DataError: ``num_shards < 1``, records beyond ``num_shards``, or shards that
                disagree on the number of temperatures.
        """
        if num_shards < 1:
            raise DataError(f"a store needs at least one shard, found num_shards={num_shards}")
        committed = self.committed_shards()
        missing = sorted(set(range(num_shards)) - committed)
        if missing:
            shown = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
            raise CorruptShardError(
                f"cannot finalize {self.url}: {len(missing)} of {num_shards} shards are not "
                f"committed (missing: {shown})"
            )
        extra = sorted(committed - set(range(num_shards)))
        if extra:
            raise DataError(f"shards {extra} are committed beyond num_shards={num_shards}")
        names = [fmt.record_name(i) for i in range(num_shards)]
        records = []
        # bounded like the manifest (size, depth, links out), then checked field by field
        for name, raw in _fs.read_json_files(self.fs, self.root, names).items():
            record = fmt.loads(raw, name)
            fmt.validate_record(record, name)
            records.append(record)
        self._check_shard_files(records)
        temps = {int(r["num_temperatures"]) for r in records}
        if len(temps) != 1:
            raise DataError(f"shards disagree on the number of temperatures: {sorted(temps)}")
        manifest = fmt.build_manifest(self.settings, records, temps.pop(), _fidelity(records), run)
        fmt.validate_manifest(manifest)
        _fs.remove(self.fs, self._path(fmt.CLAIMS_DIR))
        self._remove_temporaries()
        _fs.write_bytes_atomic(self.fs, self._path(fmt.MANIFEST_NAME), fmt.dumps(manifest))
        return manifest

    def _check_shard_files(self, records: Sequence[Mapping[str, Any]]) -> None:
        base = self._path(fmt.SHARDS_DIR)
        found = self.fs.find(base, detail=True) if self.fs.exists(base) else {}
        sizes = {str(p).lstrip("/"): int(info.get("size") or 0) for p, info in found.items()}
        for rec in records:
            for name, size in rec["files"]:
                got = sizes.get(self._path(name).lstrip("/"))
                if got != size:
                    raise CorruptShardError(
                        f"shard {rec['path']}: file {name} has "
                        f"{'no file' if got is None else f'{got} bytes'}, its record says {size} bytes"
                    )


@contextlib.contextmanager
def _writing(what: str) -> Iterator[None]:
    """Turn an operating-system error (permissions, a file in the way, a full disk) into
    :class:`OutputNotWritableError` naming what was being written; our own errors pass."""
    try:
        yield
    except LogitstoreError:
        raise
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        where = f" ({exc.filename})" if exc.filename else ""
        raise OutputNotWritableError(
            f"cannot {what}: {reason}{where}; expected a writable location"
        ) from exc


def _swap(name: str, final: str, tmp: str, root: str) -> str:
    """Store-relative ``name`` under ``final`` re-rooted under ``tmp``."""
    rel_final = final[len(root) + 1 :] if root else final
    rel_tmp = tmp[len(root) + 1 :] if root else tmp
    return rel_tmp + name[len(rel_final) :]


def _fidelity(records: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    sums = [r["fidelity"] for r in records if r.get("fidelity")]
    if not sums:
        return None
    from logitstore.codecs.fidelity import merge_fidelity, summarize_fidelity

    return dict(summarize_fidelity(merge_fidelity(sums)))


def _read_settings(fs: Any, root: str, url: str) -> dict[str, Any] | None:
    try:
        # bounded like the manifest: size, nesting, links out of the store, FIFOs
        raw = _fs.read_json(fs, root, fmt.SETTINGS_NAME)
    except FileNotFoundError:
        return None
    stored = fmt.loads(raw, fmt.SETTINGS_NAME)
    fmt.check_format_version(stored, f"{url}/{fmt.SETTINGS_NAME}")
    return stored


def stored_settings(
    url: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None
) -> dict[str, Any] | None:
    """The settings a (possibly unfinished) store at ``url`` was created with, or ``None``."""
    fs, root = _fs.url_to_fs(str(url), storage_options)
    return _read_settings(fs, root, str(url))
