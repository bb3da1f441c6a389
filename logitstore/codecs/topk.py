"""The ``topk`` codec: the ``k`` most probable ids with their log-probs.

Every value is the distance ``d = top1 - logp >= 0`` below the position's top-1 log-prob, which
is stored exactly. Layout (per position, version 1):

* ``top1`` float32 ``()``: the top-1 log-prob; decoded ``logp = top1 - d``.
* Quantized values (``q8``, ``q6``, ``q4``; grids in ``_quant.py``, code 0 = the top-1 only):
  entries are ordered by (code, id), so the order is already most probable first and decoding
  needs no sort.

  - ``values`` uint8 ``(k,)``: code deltas along the row (``codes = cumsum(values)``; the first
    is 0, the top-1's code); a non-zero delta starts a new run of equal codes.
  - ``ids0``, ``ids1``, ... uint8 ``(k,)``: byte planes of the id gaps, ids ascending within each
    run of equal codes, the first id of a run stored absolutely (``_ids.py``).

* Float values (``float32``, ``float16``, ``bfloat16``): entries in ascending id order.

  - ``ids0``, ``ids1``, ...: byte planes of the id gaps (one run).
  - ``values`` ``(k,)``: ``-d`` as float32, float16 or the raw uint16 bits of bfloat16; every
    entry but the top-1 is strictly negative.

* ``label_logprob``, ``tail_logmass``, ``tail_logsumexp``, ``entropy``: see ``_scalars.py``.

Ids are stored as themselves, or, with ``hot_ids``, in the storage order of
``_ids.hot_forward`` (the listed ids first); gaps and runs are over stored ids. The number of id
planes is ``ceil(bits(V - 1) / 8)``: no id width is fixed. Decode returns the
support most probable first (ties in stored-id order).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from logitstore.codecs import _checks, _ids, _quant, _scalars, _select
from logitstore.codecs.base import Codec, FieldSpec, Positions
from logitstore.errors import ConfigError, shown


def check_size(name: str, value: object, vocab_size: int | None = None) -> None:
    """Refuse a support size that is not a positive integer or exceeds the vocabulary."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, found {shown(value)}")
    if vocab_size is not None and value > vocab_size:
        raise ConfigError(f"{name}={value} exceeds the vocabulary size {vocab_size}")


def sort_by_probability(key: np.ndarray, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """``key`` and ``arrays`` reordered along rows so ``key`` ascends (stable: ties keep order)."""
    order = np.argsort(key, axis=1, kind="stable")
    return tuple(np.take_along_axis(a, order, axis=1) for a in (key, *arrays))


def row_cumsum(deltas: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Cumulative sums (int64) along the rows of uint8 ``(P, K)`` deltas, into ``out`` if given."""
    if out is None:
        out = np.empty(deltas.shape, dtype=np.int64)
    if deltas.size == 0:
        return out
    # One cumsum over the flattened rows is faster than one along each short row: each row's
    # first entry first loses the previous row's total, so the running sum restarts there.
    # Cast first: numpy's cumsum from uint8 into a wider type is several times slower than a
    # cast followed by a cumsum within one type.
    np.copyto(out, deltas)
    totals = out.sum(axis=1)
    out[1:, 0] -= totals[:-1]
    flat = out.reshape(-1)
    np.cumsum(flat, out=flat)
    return out


def fit_hot_ids(logits: torch.Tensor, k: int, size: int = 4096) -> tuple[int, ...]:
    """Ids most often among the top-``k`` of ``logits`` ``(P, V)``, most frequent first.

    Ties go to the smaller id; ids never in a top-``k`` are left out.
    """
    check_size("size", size)
    vocab_size = logits.shape[1]
    top = logits.topk(min(k, vocab_size), dim=1).indices.reshape(-1)
    counts = torch.bincount(top, minlength=vocab_size)
    order = torch.argsort(-counts, stable=True)[:size]
    return tuple(int(i) for i in order[counts[order] > 0].tolist())


@dataclass(frozen=True)
class TopK(Codec):
    """The ``k`` most probable ids, values quantized or stored as floats relative to the top-1.

    Args:
        k: support size per position.
        values: ``"q6"`` (the default), ``"q8"``, ``"q4"``, ``"float32"``, ``"float16"`` or
            ``"bfloat16"``.
        hot_ids: optional id order for storage: these ids are stored as ``0 .. len - 1`` and the
            others after them (see ``_ids.hot_forward``); :meth:`fit` picks the ids the teacher
            ranks in its top-k most often, which shrinks the stored id planes by 10-20 %.
    """

    name: ClassVar[str] = "topk"
    version: ClassVar[int] = 1

    k: int = 128
    values: str = "q6"
    hot_ids: tuple[int, ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        check_size("k", self.k)
        _quant.check_values(self.values)
        hot = self.hot_ids
        if not isinstance(hot, (list, tuple)) or any(
            isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in hot
        ):
            raise ConfigError("hot_ids must be a list of non-negative integer token ids")
        if len(set(hot)) != len(hot):
            raise ConfigError(f"hot_ids must not repeat ids; {len(hot) - len(set(hot))} repeat")
        object.__setattr__(self, "hot_ids", tuple(hot))  # JSON gives a list

    def to_json(self) -> dict[str, Any]:
        data = super().to_json()
        if self.hot_ids:
            data["configuration"]["hot_ids"] = list(self.hot_ids)
        else:  # the default order needs no entry
            del data["configuration"]["hot_ids"]
        return data

    def fit(self, logits: torch.Tensor, size: int = 4096) -> TopK:
        """This codec with ``hot_ids``: the ``size`` ids most often in these positions' top-k.

        Args:
            logits: float ``(P, V)`` teacher logits (or log-probs) of sample positions (the first
                batch of a teacher pass), on any device.
            size: how many ids to list at most (only ids seen in some top-k are listed).
        """
        return dataclasses.replace(self, hot_ids=fit_hot_ids(logits, self.k, size))

    def unfit(self) -> TopK:
        return dataclasses.replace(self, hot_ids=())

    def support_size(self, vocab_size: int) -> int:
        return self.k

    def fields(self, vocab_size: int, num_temperatures: int) -> dict[str, FieldSpec]:
        check_size("k", self.k, vocab_size)
        if self.hot_ids and max(self.hot_ids) >= vocab_size:
            raise ConfigError(
                f"hot_ids hold {max(self.hot_ids)}, outside the vocabulary of {vocab_size}"
            )
        out = {name: FieldSpec("uint8", (self.k,)) for name in _ids.plane_names("ids", vocab_size)}
        quantized = self.values in _quant.GRIDS
        dtype = "uint8" if quantized else _quant.float_store_dtype(self.values)
        out["values"] = FieldSpec(dtype, (self.k,))
        out["top1"] = FieldSpec("float32")
        out.update(_scalars.scalar_fields(num_temperatures))
        return out

    def encode(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        *,
        temperatures: Sequence[float] = (),
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        _scalars.check_inputs(logits, labels, temperatures)
        vocab_size = logits.shape[1]
        self.fields(vocab_size, len(temperatures))  # validates k and hot_ids against V

        def scan(z: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
            """The passes over the vocabulary, one block of rows at a time."""
            top_vals, top_ids = _select.top_k(z, self.k)  # most probable first
            out, norm = _scalars.encode_scalars(z, y, top_ids, temperatures, row_max=top_vals[:, 0])
            out["top1"] = -norm.log_sum  # the top-1's (z - max) is 0
            return {**out, "top_vals": top_vals, "top_ids": top_ids}

        out = _scalars.by_rows(scan, logits, labels)
        top_vals, top_ids = out.pop("top_vals"), out.pop("top_ids")
        # Values are distances below the top-1, so they need no normaliser: d = max - z.
        d = top_vals[:, :1] - top_vals
        stored = top_ids
        if self.hot_ids:
            stored = _ids.hot_forward(self.hot_ids, vocab_size, logits.device)[top_ids]
        is_top1 = torch.zeros_like(d, dtype=torch.bool)
        is_top1[:, 0] = True
        if self.values in _quant.GRIDS:
            codes = _quant.quantize(d, is_top1, self.values)
            order = (codes.long() * vocab_size + stored).argsort(dim=1)
            ids, codes = stored.gather(1, order), codes.gather(1, order)
            deltas = torch.diff(codes.long(), dim=1, prepend=torch.zeros_like(codes[:, :1]).long())
            out.update(_ids.encode_sorted_ids(ids, None, "ids", vocab_size, starts=deltas != 0))
            out["values"] = deltas.to(torch.uint8)
        else:
            ids, order = stored.sort(dim=1)
            out.update(_ids.encode_sorted_ids(ids, None, "ids", vocab_size))
            out["values"] = _quant.encode_float(d.gather(1, order), order == 0, self.values)
        return out

    @property
    def first_is_max(self) -> bool:
        return self.values in _quant.GRIDS  # logp = top1 - grid[code], grid finite and >= 0

    def least_probs(self, logprobs: np.ndarray, first: np.ndarray) -> np.ndarray:
        if self.values == "float32":
            return np.exp(logprobs)
        return _quant.least_probs(logprobs, first, self.values)

    def decode(self, fields: Mapping[str, np.ndarray], vocab_size: int | None = None) -> Positions:
        top1 = np.asarray(fields["top1"], dtype=np.float32)
        values = np.asarray(fields["values"])
        mass = None  # with vocab_size: the checks' support mass bound, from the codes in cache
        # With the vocabulary, checked ids map to token ids through the hot order's table (built
        # once per order), block by block in cache; without, or without a table, afterwards.
        table = None
        if vocab_size is not None and self.hot_ids:
            table = _ids.inverse_table(self.hot_ids, vocab_size)
        if self.values in _quant.GRIDS:
            starts = values != 0
            starts[:, :1] = True
            # (stored ids < V exactly when token ids are: the hot order is a permutation of V)
            ids = _ids.decode_sorted_ids(fields, "ids", starts, limit=vocab_size, table=table)
            if vocab_size is not None:
                mass = np.empty_like(top1)
            logprobs = self._decode_codes(values, top1, mass)
        else:
            ids = _ids.decode_sorted_ids(fields, "ids", limit=vocab_size, table=table)
            d, ids = sort_by_probability(_quant.decode_float(values, self.values), ids)
            logprobs = np.subtract(top1[:, None], d, out=d)  # d is a fresh float32 array
        if table is None:
            ids = _ids.hot_inverse(self.hot_ids, ids)
        pos = Positions(
            support_ids=ids,
            support_logprobs=logprobs,
            **_scalars.decode_scalars(fields, ids.shape[0]),
        )
        if vocab_size is not None:
            _checks.check_positions(self, pos, vocab_size, ids_checked=True, support_mass=mass)
        return pos

    def _decode_codes(
        self, values: np.ndarray, top1: np.ndarray, mass: np.ndarray | None
    ) -> np.ndarray:
        """Float32 ``(P, K)`` log-probs ``top1 - grid[code]`` from the code deltas; with
        ``mass`` (float32 ``(P,)``), also each position's support mass bound for the checks,
        from the codes while they are in cache."""
        logprobs = np.empty(values.shape, dtype=np.float32)
        grid, least = _grid_tables(self.values)
        if mass is not None:
            cols, weights = _checks.mass_columns(values.shape[1], exhaustive=False)
        rows = max(1, _ids.BLOCK_ENTRIES // max(values.shape[1], 1))
        scratch = np.empty(min(rows, values.shape[0]) * values.shape[1], dtype=np.int64)
        for a in range(0, values.shape[0], rows):  # blocks stay in cache, as for the ids
            block = values[a : a + rows]
            codes = row_cumsum(block, scratch[: block.size].reshape(block.shape))
            d = logprobs[a : a + rows]
            # (a corrupt code beyond the grid decodes to its last level)
            np.take(grid, codes, out=d, mode="clip")
            if mass is not None:
                at = np.take(least, codes[:, cols], mode="clip")
                np.matmul(at, weights, out=mass[a : a + rows])
            np.subtract(top1[a : a + rows, None], d, out=d)
        if mass is not None:
            mass *= np.exp(top1)
        return logprobs


@functools.cache
def _grid_tables(values: str) -> tuple[np.ndarray, np.ndarray]:
    """Float32 level distances and least probabilities of a quantized option (read-only)."""
    grid = _quant.grid(values).astype(np.float32)
    least = _quant.least_table(values)
    grid.flags.writeable = least.flags.writeable = False
    return grid, least
