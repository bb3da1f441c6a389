"""The backend interface: how one shard's arrays become files, and back.

A backend only serialises. It never touches the filesystem: ``encode`` returns the shard's files
as ``{store-relative path: bytes}`` and ``decode`` takes the same mapping, so the writer owns
atomicity and the reader owns checksums, identically for every backend and filesystem.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from logitstore.codecs.base import FieldSpec
from logitstore.errors import CorruptShardError
from logitstore.format import MAX_EXPANSION, stored_bytes

RESERVED_NAMES = frozenset({"doc_id", "doc_ids", "input_ids", "loss_mask", "offsets"})
"""Array and column names a backend uses itself; codec fields may not take them."""


def token_dtype(vocab_size: int) -> np.dtype:
    """Narrowest unsigned dtype for token ids below ``vocab_size`` (never a hard-coded width)."""
    if vocab_size <= 1 << 8:
        return np.dtype("uint8")
    if vocab_size <= 1 << 16:
        return np.dtype("uint16")
    return np.dtype("uint32")


def position_bytes(specs: Mapping[str, FieldSpec]) -> int:
    """Stored bytes of one position, uncompressed: the codec's fields and the loss mask."""
    return 1 + sum(np.dtype(s.dtype).itemsize * int(np.prod(s.shape)) for s in specs.values())


def check_expansion(
    where: str,
    files: Mapping[str, bytes],
    specs: Mapping[str, FieldSpec],
    positions: int,
    documents: int,
    token_bytes: int,
) -> None:
    """Refuse a shard whose arrays, uncompressed, would exceed :data:`MAX_EXPANSION` times
    its bytes on disk; a backend calls this before allocating any array.

    Chunks equal to the fill value are not stored and zstd shrinks runs of a byte to almost
    nothing, so without this bound a shard of a few KB could declare millions of positions
    and make a reader allocate gigabytes of zeros.

    Raises:
        CorruptShardError: naming the shard, the counts and both sizes.
    """
    if isinstance(positions, bool) or not isinstance(positions, int) or positions < 0:
        raise CorruptShardError(
            f"shard {where}: expected a count of positions, found {positions!r}"
        )
    tokens = positions + documents
    arrays = stored_bytes(positions, tokens, documents, position_bytes(specs), token_bytes)
    stored = sum(len(data) for data in files.values())
    if arrays > MAX_EXPANSION * stored:
        raise CorruptShardError(
            f"shard {where}: {positions} positions in {documents} documents make "
            f"{arrays} bytes of arrays, expected at most {MAX_EXPANSION} times the "
            f"{stored} bytes stored"
        )


@dataclass
class ShardArrays:
    """One shard's documents, concatenated.

    Attributes:
        doc_ids: ``D`` document ids.
        offsets: int64 ``(D + 1,)``; document ``d`` owns tokens ``offsets[d]:offsets[d+1]``
            and positions ``offsets[d] - d : offsets[d+1] - d - 1`` (one fewer position than
            tokens per document).
        input_ids: int64 ``(N,)`` token ids, ``N = offsets[-1]``.
        loss_mask: bool ``(N - D,)``.
        fields: codec arrays, each ``(N - D, *spec.shape)`` with the spec's dtype.
    """

    doc_ids: list[str]
    offsets: np.ndarray
    input_ids: np.ndarray
    loss_mask: np.ndarray
    fields: dict[str, np.ndarray]

    @property
    def num_documents(self) -> int:
        return len(self.doc_ids)

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def num_positions(self) -> int:
        return self.num_tokens - self.num_documents

    def position_offsets(self) -> np.ndarray:
        """int64 ``(D + 1,)`` position boundaries of each document."""
        return self.offsets - np.arange(len(self.offsets), dtype=np.int64)

    def check(self, specs: Mapping[str, FieldSpec], where: str) -> None:
        """Raise ``CorruptShardError`` unless lengths, shapes and dtypes fit together.

        Args:
            specs: the codec's field specs.
            where: shard name for the message.
        """
        d = len(self.doc_ids)
        off = self.offsets
        # compared, not subtracted: differences of int64 offsets wrap around (0, 2^62, -2^63,
        # -2^62, N has every difference >= 1)
        if off.shape != (d + 1,) or off[0] != 0 or np.any(off[1:] <= off[:-1]):
            raise CorruptShardError(
                f"shard {where}: offsets must be increasing from 0 with {d + 1} entries "
                f"(each document has >= 1 token), found shape {off.shape}"
            )
        n, p = self.num_tokens, self.num_positions
        if self.input_ids.shape != (n,):
            raise CorruptShardError(
                f"shard {where}: input_ids shape {self.input_ids.shape}, expected ({n},)"
            )
        if self.loss_mask.shape != (p,) or self.loss_mask.dtype != np.bool_:
            raise CorruptShardError(
                f"shard {where}: loss_mask {self.loss_mask.dtype} {self.loss_mask.shape}, "
                f"expected bool ({p},)"
            )
        if set(self.fields) != set(specs):
            raise CorruptShardError(
                f"shard {where}: fields {sorted(self.fields)}, expected {sorted(specs)}"
            )
        for name, spec in specs.items():
            arr = self.fields[name]
            expected = (p, *spec.shape)
            if arr.shape != expected or arr.dtype != np.dtype(spec.dtype):
                raise CorruptShardError(
                    f"shard {where}: field {name!r} is {arr.dtype} {arr.shape}, "
                    f"expected {spec.dtype} {expected}"
                )


class Backend(ABC):
    """Serialises :class:`ShardArrays` to files and back. Stateless; one instance per name."""

    name: ClassVar[str]
    suffix: ClassVar[str]
    """Shard path suffix, e.g. ``.zarr``; the shard of index 17 is ``shards/000017<suffix>``."""

    @abstractmethod
    def encode(
        self,
        shard_path: str,
        arrays: ShardArrays,
        specs: Mapping[str, FieldSpec],
        *,
        vocab_size: int,
        compression_level: int | None,
    ) -> dict[str, bytes]:
        """The shard's files, keyed by store-relative path (``shard_path`` or below it).

        ``compression_level`` is zstd's level, or ``None`` for arrays stored uncompressed.
        Must be deterministic: the same arrays give the same bytes.
        """

    @abstractmethod
    def decode(
        self,
        shard_path: str,
        files: Mapping[str, bytes],
        specs: Mapping[str, FieldSpec],
        *,
        expected_positions: int,
    ) -> ShardArrays:
        """Arrays from the files ``encode`` wrote; ``input_ids`` come back as int64.

        Args:
            shard_path: store-relative shard path, as in the manifest.
            files: store-relative path to bytes (already checksum-verified by the caller).
            specs: the codec's field specs; stored dtypes and shapes must match them.
            expected_positions: position count from the manifest; a backend refuses to
                allocate arrays of any other size (a hostile file cannot make it allocate more).

        Raises:
            CorruptShardError: files that do not parse, or shapes/dtypes that disagree.
        """
