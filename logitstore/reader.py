"""The store reader: read-only, verified access to a finalized store.

Every shard read fetches the shard's files, checks their sizes and SHA-256 against the manifest,
then decodes; so a flipped byte, a truncated or a deleted file is refused with
``CorruptShardError`` naming the shard, never returned as wrong numbers. Reading runs no code
from the store: JSON and plain numeric arrays only, no pickle, and no path outside the root.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from logitstore import _block, _verify
from logitstore import format as fmt
from logitstore.codecs._cached import codec_and_specs
from logitstore.codecs._checks import check_positions
from logitstore.codecs.base import Codec, FieldSpec, Positions
from logitstore.document import Document, shown_id
from logitstore.errors import (
    BadValueError,
    ConfigError,
    CorruptShardError,
    LogitstoreError,
    ManifestError,
    StoreNotFoundError,
)
from logitstore.storage import BACKENDS, Backend, ShardArrays, _fs, _shard_cache
from logitstore.storage.base import position_bytes, token_dtype


class LogitStore:
    """A finalized store, opened read-only. Use :func:`open_store`.

    Documents returned share memory with their decoded shard (one shard is cached), so holding
    one document keeps its shard's arrays alive.

    Remote stores (``s3://``, ``hf://``, any fsspec URL) are read shard by shard, never
    downloaded whole first. Two options help there:

    * read-ahead: :meth:`prefetch` fetches shards' files in background threads while the
      caller decodes or trains; :meth:`iter_documents` fetches the next ``readahead`` shards
      this way by itself. A prefetched shard is verified exactly like one read directly.
    * a local cache (``cache_dir``): verified shard files are kept under their SHA-256, so a
      second epoch or a second run reads them locally. Content addressing makes a stale entry
      impossible: a shard rewritten upstream has another checksum and is fetched again.

    Args:
        url: local path or fsspec URL.
        storage_options: passed to fsspec.
        readahead: shards fetched ahead by :meth:`iter_documents` (0: none); also the number
            of background fetch threads.
        cache_dir: local directory for the shard cache; ``None`` (default) caches nothing.
            Ignored for local stores, which need no cache.

    Attributes:
        url: where the store lives.
        manifest: the parsed, validated manifest.
        codec: the codec the manifest names.
        backend: the storage backend the manifest names.
        specs: the codec's field specs for this store's vocabulary and temperatures.
    """

    def __init__(
        self,
        url: str | os.PathLike[str],
        storage_options: Mapping[str, Any] | None = None,
        *,
        readahead: int = 1,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        if isinstance(readahead, bool) or not isinstance(readahead, int) or readahead < 0:
            raise ConfigError(f"readahead must be an int >= 0, found {readahead!r}")
        self.url = str(url)
        self.readahead = readahead
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.fs, self.root = _fs.url_to_fs(self.url, storage_options)
        self.manifest = self._load_manifest()
        try:
            self.codec: Codec
            self.codec, specs = codec_and_specs(
                self.manifest["codec"], self.vocab_size, self.manifest["num_temperatures"]
            )
            self.specs: dict[str, FieldSpec] = dict(specs)
        except ConfigError as exc:
            raise ManifestError(f"{fmt.MANIFEST_NAME} field codec.configuration: {exc}") from None
        self.backend: Backend = BACKENDS[self.manifest["backend"]]
        shards = self.manifest["shards"]
        fmt.check_declared_sizes(
            shards,
            position_bytes(self.specs),
            token_dtype(self.vocab_size).itemsize,
            self.codec.decoded_bytes(self.vocab_size, self.manifest["num_temperatures"]),
        )
        first: dict[str, int] = {}
        for j, s in enumerate(shards):
            k = first.setdefault(s["path"], j)
            if k != j:
                raise ManifestError(
                    f"{fmt.MANIFEST_NAME} field shards[{j}].path: {s['path']!r} is the path of "
                    f"shards[{k}] too; expected one path per shard"
                )
            for i, (name, _) in enumerate(s["files"]):
                if name != s["path"] and not name.startswith(s["path"] + "/"):
                    raise ManifestError(
                        f"{fmt.MANIFEST_NAME} field shards[{j}].files[{i}]: {name!r} lies "
                        f"outside the shard's path {s['path']!r}; expected files under it"
                    )
        self._doc_starts = np.zeros(len(shards) + 1, dtype=np.int64)
        np.cumsum([s["documents"] for s in shards], out=self._doc_starts[1:])
        self._cache: tuple[int, list[Document]] | None = None
        self._check_values = True  # decoded values are checked; off only to time the checks
        self._reset_prefetch()

    def _reset_prefetch(self) -> None:
        # Created lazily and per process: a forked DataLoader worker must not inherit threads.
        self._executor: ThreadPoolExecutor | None = None
        self._executor_pid = os.getpid()
        self._pending: dict[int, Future[dict[str, bytes]]] = {}
        self._lock = threading.Lock()
        self._gather = _block.GatherBuffer()  # read_block's gathered rows, reused

    def __getstate__(self) -> dict[str, Any]:
        # Threads, futures and locks do not pickle; a copy starts without read-ahead in flight.
        state = self.__dict__.copy()
        for key in ("_executor", "_pending", "_lock", "_cache", "_gather"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._cache = None
        self._reset_prefetch()

    def _load_manifest(self) -> dict[str, Any]:
        try:
            raw = _fs.read_json(self.fs, self.root, fmt.MANIFEST_NAME)
        except FileNotFoundError:
            if self.fs.exists(_fs.join(self.root, fmt.SETTINGS_NAME)):
                raise StoreNotFoundError(
                    f"{self.url} holds an unfinished store (no {fmt.MANIFEST_NAME}); finish "
                    "or resume the run that writes it"
                ) from None
            try:
                there = self.fs.exists(self.root)
            except OSError:
                there = True  # (the message below then says what is known for sure)
            if not there:
                raise StoreNotFoundError(
                    f"no store at {self.url}: the path does not exist"
                ) from None
            raise StoreNotFoundError(f"no store at {self.url} (no {fmt.MANIFEST_NAME})") from None
        manifest = fmt.loads(raw, fmt.MANIFEST_NAME)
        fmt.validate_manifest(manifest)
        return manifest

    # -- sizes -------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    @property
    def num_shards(self) -> int:
        return len(self.manifest["shards"])

    @property
    def num_documents(self) -> int:
        return int(self._doc_starts[-1])

    @property
    def num_tokens(self) -> int:
        return int(sum(s["tokens"] for s in self.manifest["shards"]))

    def __len__(self) -> int:
        return self.num_documents

    def __repr__(self) -> str:
        codec = self.manifest["codec"]["name"]
        return (
            f"LogitStore({self.url!r}, {self.manifest['backend']}, {codec}, "
            f"{self.num_documents} documents, {self.num_tokens} tokens)"
        )

    def shard_document_range(self, j: int) -> tuple[int, int]:
        """Global indices ``[start, stop)`` of shard ``j``'s documents."""
        j = self._shard_index(j)
        return int(self._doc_starts[j]), int(self._doc_starts[j + 1])

    def _shard_index(self, j: int) -> int:
        if not -self.num_shards <= j < self.num_shards:
            raise IndexError(f"shard {j} out of range; the store has {self.num_shards} shards")
        return j % self.num_shards

    # -- reading -----------------------------------------------------------------------------

    def prefetch(self, shards: Iterable[int], *, caller_reads_first: bool = False) -> None:
        """Start fetching the files of ``shards`` in the background (read-ahead).

        A later read of one of them waits for its fetch instead of starting another. List the
        most urgent first: at most ``max(readahead, 1) + 1`` fetches are kept in flight and
        requests beyond that are ignored (those shards are fetched when read); fetches of
        shards not listed any more are dropped. Errors surface when the shard is read, as
        they would without read-ahead.

        Args:
            shards: shard numbers, most urgent first.
            caller_reads_first: the caller reads the first listed shard at once: unless a
                fetch of it is in flight already, that read fetches it in the caller's own
                thread (no hand-over to a read-ahead thread, and none started for a store
                of one shard).
        """
        wanted = [self._shard_index(j) for j in shards]
        with self._lock:
            if wanted and caller_reads_first and not self._in_flight(wanted[0]):
                wanted = wanted[1:]
            if self._executor_pid != os.getpid():  # a forked child: the parent's are not ours
                self._executor, self._pending = None, {}
            for stale in [j for j in self._pending if j not in wanted]:
                self._pending.pop(stale).cancel()  # no longer wanted (e.g. iteration abandoned)
            for j in wanted:
                if len(self._pending) > max(self.readahead, 1):
                    break  # bounded memory: a prefetched shard's files wait here until read
                if j in self._pending or (self._cache is not None and self._cache[0] == j):
                    continue
                if self._executor is None:
                    self._executor = ThreadPoolExecutor(
                        max_workers=max(self.readahead, 1),
                        thread_name_prefix="logitstore-readahead",
                    )
                    self._executor_pid = os.getpid()
                entry = self.manifest["shards"][j]
                self._pending[j] = self._executor.submit(self._fetch, entry)

    def _in_flight(self, j: int) -> bool:
        return self._executor_pid == os.getpid() and j in self._pending

    def _take(self, j: int) -> dict[str, bytes]:
        """Shard ``j``'s verified files: from a read-ahead in flight, else fetched now."""
        with self._lock:
            future = self._pending.pop(j, None) if self._executor_pid == os.getpid() else None
        if future is not None and not future.cancelled():
            return future.result()
        return self._fetch(self.manifest["shards"][j])

    def _fetch(self, entry: Mapping[str, Any]) -> dict[str, bytes]:
        """The shard's files, checked for presence, size and checksum (cache first, if any)."""
        folder = None
        if self.cache_dir is not None and not _fs.is_local(self.fs):
            folder = _shard_cache.entry_folder(self.cache_dir, entry)
        if folder is not None:
            cached = _shard_cache.load(entry, folder)
            if cached is not None:
                return cached
        files = _verify.fetch_verified(self.fs, self.root, entry)
        if folder is not None:
            _shard_cache.save(files, entry, folder)
        return files

    def read_shard_arrays(self, j: int) -> ShardArrays:
        """Shard ``j``'s encoded arrays, verified (checksum, shapes, counts), not decoded."""
        j = self._shard_index(j)
        entry = self.manifest["shards"][j]
        where = entry["path"]
        files = self._take(j)
        arrays = self.backend.decode(
            where, files, self.specs, expected_positions=entry["positions"]
        )
        arrays.check(self.specs, where)
        counts = (arrays.num_documents, arrays.num_tokens, arrays.num_positions)
        if counts != (entry["documents"], entry["tokens"], entry["positions"]):
            raise CorruptShardError(
                f"shard {where}: holds {counts} (documents, tokens, positions), the manifest "
                f"says {(entry['documents'], entry['tokens'], entry['positions'])}"
            )
        # (a negative id is one stored as uint64 beyond 2^63, wrapped by the cast to int64)
        ids = arrays.input_ids
        if arrays.num_tokens and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise CorruptShardError(
                f"shard {where}: token ids reach beyond the vocabulary [0, {self.vocab_size})"
            )
        return arrays

    def read_shard(self, j: int) -> list[Document]:
        """All documents of shard ``j``, decoded with one vectorised ``codec.decode`` call."""
        j = self._shard_index(j)
        if self._cache is not None and self._cache[0] == j:
            return list(self._cache[1])
        arrays = self.read_shard_arrays(j)
        positions = self.decode_shard(j, arrays)
        off, pos = arrays.offsets, arrays.position_offsets()
        docs = [
            Document(
                doc_id=doc_id,
                input_ids=arrays.input_ids[off[d] : off[d + 1]],
                loss_mask=arrays.loss_mask[pos[d] : pos[d + 1]],
                positions=positions.slice(int(pos[d]), int(pos[d + 1])),
            )
            for d, doc_id in enumerate(arrays.doc_ids)
        ]
        self._cache = (j, docs)
        return list(docs)

    def decode_shard(self, j: int, arrays: ShardArrays, *, exhaustive: bool = False) -> Positions:
        """Shard ``j``'s positions from its arrays (:meth:`read_shard_arrays`), decoded and
        checked (``codecs/_checks.py``: ids, NaN, signs, mass), as one block.

        Raises:
            BadValueError: naming the shard, document, position and field of the first bad
                value; ``exhaustive`` sums every support column for the mass check.
            CorruptShardError: the codec cannot decode the arrays.
        """
        where = self.manifest["shards"][j]["path"]
        starts = arrays.position_offsets()

        def locate(row: int) -> _block.Piece:
            d = int(np.searchsorted(starts, row, side="right")) - 1
            return _block.Piece(where, d, arrays.doc_ids[d], int(starts[d]), int(starts[d + 1]))

        return self._decode(arrays.fields, locate, f"shard {where}", exhaustive=exhaustive)

    def read_block(self, indices: Sequence[int] | np.ndarray) -> tuple[list[Document], Positions]:
        """Documents ``indices`` (numbers in store order), in that order, decoded as one block.

        The encoded rows of the listed documents are gathered into this order first (a few
        bytes per support entry), then decoded and checked in one ``codec.decode`` call, so
        document ``i + 1``'s positions are the rows right after document ``i``'s in the returned
        :class:`Positions`: a run of consecutive documents is one slice of it, with no copy of
        the decoded arrays. Documents not listed are fetched with their shards but neither
        decoded nor checked. ``StoreDataset`` reads its shuffled windows this way.

        Returns:
            The documents (their positions are views of the block) and the block.

        Raises:
            IndexError: an index outside the store.
            BadValueError: naming the shard, document, position and field of the first bad
                value in the listed documents.
        """
        return _block.read_block(self, indices)

    def _decode(
        self,
        fields: Mapping[str, np.ndarray],
        locate: Callable[[int], _block.Piece],
        where: str,
        *,
        exhaustive: bool = False,
    ) -> Positions:
        """Decode and check ``fields``; a bad value's error names the shard, document and
        position that ``locate`` gives for its row, other failures name ``where``."""
        check = self._check_values or exhaustive
        # Checked values name what is wrong, so numpy's warnings on a hostile value on the way
        # (an overflowing exp, a signalling NaN) are left unsaid; unchecked, they are all a
        # user hears of it.
        quiet: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        if check:
            quiet = np.errstate(over="ignore", invalid="ignore")
        try:
            with quiet:
                # With the vocabulary, the codec checks every value as it decodes
                # (codecs/_checks.py).
                positions = self.codec.decode(fields, self.vocab_size if check else None)
                if exhaustive:  # and verify sums every support column for the mass
                    check_positions(self.codec, positions, self.vocab_size, exhaustive=True)
        except BadValueError as exc:
            if not 0 <= exc.row < len(next(iter(fields.values()), ())):
                raise BadValueError(f"{where}: {exc}", exc.row, exc.field) from None
            p = locate(exc.row)
            doc = shown_id(p.doc_id)
            raise BadValueError(
                f"shard {p.shard}: document {p.index} ({doc}), position {exc.row - p.start}: {exc}",
                exc.row,
                exc.field,
            ) from None
        except LogitstoreError:
            raise
        except Exception as exc:  # the checksum matched, so this is a writer/codec mismatch
            raise CorruptShardError(
                f"{where}: codec cannot decode it ({type(exc).__name__}: {exc})"
            ) from None
        return positions

    def __getitem__(self, i: int) -> Document:
        """Document ``i`` in store order (negative indices count from the end)."""
        if not isinstance(i, (int, np.integer)) or isinstance(i, bool):
            raise TypeError(f"document index must be an int, found {type(i).__name__}")
        n = self.num_documents
        if not -n <= i < n:
            raise IndexError(f"document {i} out of range; the store has {n} documents")
        i = int(i) % n
        j = int(np.searchsorted(self._doc_starts, i, side="right")) - 1
        return self.read_shard(j)[i - int(self._doc_starts[j])]

    def iter_documents(self) -> Iterator[Document]:
        """Every document, shard by shard, fetching the next ``readahead`` shards meanwhile."""
        for j in range(self.num_shards):
            if self.readahead:  # the next shards, fetched while this one is read and decoded
                self.prefetch(
                    range(j, min(j + 1 + self.readahead, self.num_shards)), caller_reads_first=True
                )
            yield from self.read_shard(j)

    def __iter__(self) -> Iterator[Document]:
        return self.iter_documents()

    def summary(self) -> dict[str, Any]:
        """What ``logitstore inspect`` prints: sizes, codec, teacher and fidelity."""
        m = self.manifest
        stats = m["statistics"]
        return {
            "url": self.url,
            "format_version": m["format_version"],
            "backend": m["backend"],
            "codec": m["codec"],
            "vocab_size": self.vocab_size,
            "tail_temperatures": fmt.tail_temperatures(m),
            "shards": self.num_shards,
            "documents": self.num_documents,
            "tokens": self.num_tokens,
            "bytes": stats.get("bytes"),
            "bytes_per_token": stats.get("bytes_per_token"),
            "fidelity": stats.get("fidelity"),
            **{key: m[key] for key in fmt.METADATA_KEYS},
        }

    # -- checking ----------------------------------------------------------------------------

    def verify(self, on_shard: Callable[[int], None] | None = None) -> list[str]:
        """Every problem found: manifest totals, then each shard's files, checksum, shapes and
        values (for every position; the first bad one of each shard is named), and document ids
        that repeat.

        Args:
            on_shard: called with each shard's index once it is checked (progress).

        Returns:
            One message per problem, each naming the shard or field; empty when all is well.
        """
        return _verify.verify(self, on_shard)


def open_store(
    url: str | os.PathLike[str],
    storage_options: Mapping[str, Any] | None = None,
    *,
    readahead: int = 1,
    cache_dir: str | os.PathLike[str] | None = None,
) -> LogitStore:
    """Open a finalized store read-only.

    Every URL goes through fsspec, so ``hf://datasets/ORG/NAME`` is read by the same code as
    ``s3://bucket/prefix`` or ``memory://``: manifest first, then each shard's files when
    it is read (never the whole store up front).

    Args:
        url: local path or fsspec URL (``memory://``, ``s3://``, ``hf://``, ...).
        storage_options: passed to fsspec (e.g. ``{"client_kwargs": {"endpoint_url": ...}}``
            for an S3-compatible server; credentials come from the usual environment).
        readahead: shards fetched ahead in the background when iterating (0: none).
        cache_dir: keep verified shard files of a remote store in this local directory.

    Raises:
        StoreNotFoundError: no manifest there.
        ManifestError: invalid JSON or a missing field; ``FormatVersionError`` for an unknown
            format version.
        UnknownNameError: unknown codec or backend.
        UnsafePathError: a shard path that escapes the store.
    """
    return LogitStore(url, storage_options, readahead=readahead, cache_dir=cache_dir)
