"""Several teachers over the same documents: one store holding their weighted mixture.

``mix_stores([a, b], out, weights=[0.5, 0.5])`` writes a new store whose teacher distribution
at each position is ``p = sum_a w_a p_a``. Students then train against it with any objective
on the bucket model, exactly as against a single teacher's store.

What is exact and what is approximated. Each store knows, per position, its support ``S_a``
with exact log-probs, its tail mass ``r_a = 1 - sum_{S_a} p_a`` and the label's log-prob
``log p_a(y)``. A token outside ``S_a`` (other than the label) has an unknown ``p_a``; the
mixture takes teacher ``a``'s remaining mass ``rho_a = 1 - sum_{S_a ∪ {y}} p_a`` spread
uniformly over the ``c_a = V - |S_a ∪ {y}|`` tokens it did not store (see
:data:`APPROXIMATION`, also recorded in the output manifest under
``teacher.mixture.approximation``). Consequences:

* the label log-prob is mixed exactly: ``log p(y) = logsumexp_a(log w_a + log p_a(y))``;
* a token every teacher stored is mixed exactly; others carry the uniform-tail estimate;
* the output tail mass is ``1 - sum`` of the output support under that same estimate, and the
  total mass of each teacher is kept: ``sum_i p_a(i) = sum_{S_a ∪ {y}} p_a + rho_a``;
* when every teacher's support covers the vocabulary (``dense``, or ``topk`` with ``k = V``)
  there is nothing to estimate and the mixture is exact (to float32).

The output support is the ``k`` most probable tokens of the mixture (default codec ``topk``
with float32 values and ``k`` = the largest union of the supports at any position, found by a
first pass over the stores). A token stored by any teacher is never less probable under the
estimate than one stored by none (for ``topk`` and ``dense`` inputs), so the support holds
the union; where the union is smaller than ``k`` it is topped up with the most probable
estimated tokens, whose values are then the uniform-tail estimate. Tail log-sum-exps at extra temperatures cannot be
mixed from the stored numbers, so the output captures temperature 1 only.

Stores must share the tokenizer (``TokenizerMismatchError`` with both values otherwise), the
document ids, and each document's tokens and loss mask. The output follows the first store's
document order and shard boundaries.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from logitstore import format as fmt
from logitstore.codecs import get_codec
from logitstore.codecs.base import Codec, Positions
from logitstore.document import Document, shown_id
from logitstore.errors import ConfigError, DataError, LogitstoreError, TokenizerMismatchError
from logitstore.reader import LogitStore, open_store
from logitstore.writer import EncodedDocument, StoreWriter

APPROXIMATION = (
    "mixture of teachers: p(i) = sum_a w_a p_a(i). Where teacher a did not store token i "
    "(outside its support and not the label), p_a(i) is taken as its remaining mass "
    "(1 - sum of its stored support and label probabilities) spread uniformly over the "
    "tokens it did not store. Label log-probs are mixed exactly; tokens every teacher stored "
    "are mixed exactly; exact when every teacher's support covers the vocabulary. The mixture "
    "is then renormalised to sum to 1 (stored values and float16 tails are rounded, so it is "
    "off by about their rounding), which shifts every log-prob of a position, the label's "
    "included, by the same small constant. Extra capture temperatures are not carried over."
)
"""The approximation a mixed store makes, recorded verbatim in its manifest."""

_CHUNK_ELEMENTS = 1 << 22
"""Dense ``(positions, V)`` float64 elements built at once (32 MiB), bounding memory."""


def teacher_dense_logprobs(positions: Positions, labels: np.ndarray, vocab_size: int) -> np.ndarray:
    """One teacher's full-vocabulary log-probs as the mixture estimates them (float64).

    Args:
        positions: the teacher's decoded positions, ``P`` rows (support ``(P, K)``).
        labels: int ``(P,)`` next-token ids.
        vocab_size: ``V``.

    Returns:
        float64 ``(P, V)``: stored log-probs on the support, the exact label log-prob at the
        label, and the remaining mass spread uniformly over every other token.
    """
    ids = positions.support_ids.astype(np.int64)
    logp = positions.support_logprobs.astype(np.float64)
    label = positions.label_logprob.astype(np.float64)
    valid = ids >= 0
    rows = np.arange(len(labels))
    in_support = ((ids == labels[:, None]) & valid).any(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        label_mass = np.where(in_support, 0.0, np.exp(label))
        rest = np.maximum(np.exp(positions.tail_logmass.astype(np.float64)) - label_mass, 0.0)
        count = vocab_size - valid.sum(axis=1) - (~in_support)
        fill = np.where(count > 0, np.log(rest) - np.log(np.maximum(count, 1)), -np.inf)
    dense = np.repeat(fill[:, None], vocab_size, axis=1)
    r, c = np.nonzero(valid)
    dense[r, ids[r, c]] = logp[r, c]
    dense[rows, labels] = label
    return dense


def mix_logprobs(
    parts: Sequence[Positions], labels: np.ndarray, weights: Sequence[float], vocab_size: int
) -> np.ndarray:
    """``log sum_a w_a p_a`` over the vocabulary, float64 ``(P, V)`` (module docstring)."""
    total = None
    for part, w in zip(parts, weights, strict=True):
        term = math.log(w) + teacher_dense_logprobs(part, labels, vocab_size)
        total = term if total is None else np.logaddexp(total, term)
    assert total is not None  # at least one store, checked by the caller
    return total


def _check_compatible(stores: Sequence[LogitStore]) -> None:
    first = stores[0]
    for other in stores[1:]:
        diff = fmt.first_difference(first.manifest["tokenizer"], other.manifest["tokenizer"])
        if diff or first.vocab_size != other.vocab_size:
            where = f"tokenizer.{diff[0]}" if diff else "vocab_size"
            raise TokenizerMismatchError(
                f"stores use different tokenizers: {first.url} has "
                f"{first.manifest['tokenizer']} (vocabulary {first.vocab_size}), {other.url} has "
                f"{other.manifest['tokenizer']} (vocabulary {other.vocab_size}); first "
                f"difference at {where}"
            )


@contextlib.contextmanager
def naming(url: str) -> Iterator[None]:
    """Errors raised inside name the store ``url`` first: the stores of a mixture have shards
    and manifests of the same names, so ``shard shards/000001.zarr: checksum mismatch`` alone
    would not say which store is damaged."""
    try:
        yield
    except LogitstoreError as exc:
        if str(exc).startswith(url):
            raise
        named = copy.copy(exc)  # same class and attributes (a BadValueError's row and field)
        named.args = (f"store {url}: {exc}",)
        raise named from None


def _open(store: str | os.PathLike[str], storage_options: Mapping[str, Any] | None) -> LogitStore:
    with naming(str(store)):
        return open_store(store, storage_options, readahead=0)


def _read_shard(store: LogitStore, j: int) -> list[Document]:
    with naming(store.url):
        return store.read_shard(j)


def _doc_index(store: LogitStore) -> dict[str, tuple[int, int]]:
    """``doc_id -> (shard, index in shard)``, refusing repeated ids."""
    index: dict[str, tuple[int, int]] = {}
    for j in range(store.num_shards):
        with naming(store.url):
            doc_ids = store.read_shard_arrays(j).doc_ids
        for d, doc_id in enumerate(doc_ids):
            if doc_id in index:
                raise DataError(f"store {store.url}: document id {shown_id(doc_id)} appears twice")
            index[doc_id] = (j, d)
    return index


def _check_same_documents(
    stores: Sequence[LogitStore], indexes: Sequence[Mapping[str, Any]]
) -> None:
    ids = set(indexes[0])
    for store, index in zip(stores[1:], indexes[1:], strict=True):
        if set(index) != ids:
            only_a, only_b = sorted(ids - set(index)), sorted(set(index) - ids)
            a, b = (f"[{', '.join(map(shown_id, only[:3]))}]" for only in (only_a, only_b))
            raise DataError(
                f"stores hold different documents: {stores[0].url} has {len(ids)}, {store.url} "
                f"has {len(index)}; e.g. only in the first: {a}, only in the other: {b}"
            )


class _Lookup:
    """Documents of one store by id, fetched a shard's worth of ids at a time."""

    def __init__(self, store: LogitStore) -> None:
        self.store = store
        self.index = _doc_index(store)

    def get_many(self, doc_ids: Sequence[str]) -> list[Document]:
        """The documents ``doc_ids`` (one output shard's), in that order.

        Each shard they lie in is decoded once, in shard order, and the documents are copied
        out of it, so it is freed before the next. Fetched one by one, documents that the two
        stores order differently (every other one in another shard) cost a whole shard's
        decoding each: a store of a few thousand documents took minutes to mix.
        """
        wanted: dict[int, list[tuple[int, int]]] = {}
        for i, doc_id in enumerate(doc_ids):
            j, d = self.index[doc_id]
            wanted.setdefault(j, []).append((i, d))
        found: dict[int, Document] = {}
        for j in sorted(wanted):
            docs = _read_shard(self.store, j)  # (the reader keeps the last shard decoded)
            found.update((i, _owned(docs[d])) for i, d in wanted[j])
        return [found[i] for i in range(len(doc_ids))]


def _owned(doc: Document) -> Document:
    """``doc`` with arrays of its own, not views of its shard's (which can then be freed)."""
    p = doc.positions
    counts = None if p.support_counts is None else p.support_counts.copy()
    positions = Positions(
        p.support_ids.copy(), p.support_logprobs.copy(), p.tail_logmass.copy(),
        p.label_logprob.copy(), p.tail_logsumexp.copy(), p.entropy.copy(), counts,
    )  # fmt: skip
    return Document(doc.doc_id, doc.input_ids.copy(), doc.loss_mask.copy(), positions)


def _mix_document(
    docs: Sequence[Document], weights: Sequence[float], vocab_size: int, codec: Codec
) -> EncodedDocument:
    first = docs[0]
    for doc in docs[1:]:
        if not np.array_equal(doc.input_ids, first.input_ids):
            raise DataError(f"document {shown_id(first.doc_id)}: the stores hold different tokens")
        if not np.array_equal(doc.loss_mask, first.loss_mask):
            raise DataError(
                f"document {shown_id(first.doc_id)}: the stores hold different loss masks"
            )
    labels = first.input_ids[1:].astype(np.int64)
    step = max(1, _CHUNK_ELEMENTS // vocab_size)
    chunks = []
    for start in range(0, len(labels), step):
        stop = min(start + step, len(labels))
        parts = [doc.positions.slice(start, stop) for doc in docs]
        mixed = mix_logprobs(parts, labels[start:stop], weights, vocab_size)
        enc = codec.encode(
            torch.from_numpy(mixed.astype(np.float32)), torch.from_numpy(labels[start:stop])
        )
        chunks.append({k: v.cpu().numpy() for k, v in enc.items()})
    if not chunks:  # a one-token document has no positions; encode an empty batch for shapes
        enc = codec.encode(torch.zeros(0, vocab_size), torch.zeros(0, dtype=torch.int64))
        chunks.append({k: v.cpu().numpy() for k, v in enc.items()})
    fields = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
    return EncodedDocument(first.doc_id, first.input_ids, first.loss_mask, fields)


def _weights(weights: Sequence[float] | None, n: int) -> list[float]:
    w = [1.0 / n] * n if weights is None else [float(x) for x in weights]
    if len(w) != n or not all(math.isfinite(x) and x > 0 for x in w):
        raise ConfigError(f"expected {n} positive finite weights, found {weights!r}")
    total = sum(w)
    return [x / total for x in w]


def mix_stores(
    stores: Sequence[str | os.PathLike[str] | LogitStore],
    out: str | os.PathLike[str],
    *,
    weights: Sequence[float] | None = None,
    codec: Codec | None = None,
    backend: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
    out_storage_options: Mapping[str, Any] | None = None,
    compression_level: int = 9,
    on_shard: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Write the weighted mixture of several teachers' stores to a new store ``out``.

    Args:
        stores: two or more finalized stores (URLs or opened) over the same documents.
        out: new, empty location.
        weights: one positive weight per store, normalised to sum 1 (default: equal).
        codec: output codec (default ``topk`` with float32 values and ``k`` = the largest
            union of the input supports at any position).
        backend: output backend (default: the first store's).
        storage_options: fsspec options of the input stores given as URLs.
        out_storage_options: fsspec options of ``out`` (default: ``storage_options``).
        compression_level: zstd level.
        on_shard: called with each shard index once it is written (progress).

    Returns:
        The output manifest; ``teacher.mixture`` records the weights, the input stores'
        teachers and codecs, and :data:`APPROXIMATION`.

    Raises:
        ConfigError: fewer than two stores, or bad weights.
        TokenizerMismatchError: the stores' tokenizers or vocabularies differ.
        DataError: the stores hold different documents, tokens or loss masks.
    """
    if len(stores) < 2:
        raise ConfigError(f"mixing needs at least two stores, found {len(stores)}")
    opened = [s if isinstance(s, LogitStore) else _open(s, storage_options) for s in stores]
    w = _weights(weights, len(opened))
    _check_compatible(opened)
    lookups = [_Lookup(s) for s in opened]
    _check_same_documents(opened, [lk.index for lk in lookups])
    vocab = opened[0].vocab_size
    if codec is None:
        codec = get_codec("topk", k=_largest_union(opened, lookups), values="float32")
    first = opened[0].manifest
    mixture = {
        "weights": w,
        "approximation": APPROXIMATION,
        "stores": [
            {"url": s.url, "teacher": s.manifest["teacher"], "codec": s.manifest["codec"]}
            for s in opened
        ],
    }
    names = [
        str(s.manifest["teacher"].get("model") or s.manifest["teacher"].get("id") or s.url)
        for s in opened
    ]
    metadata = {
        "teacher": {"model": " + ".join(names), "mixture": mixture},
        "tokenizer": first["tokenizer"],
        "capture": {**first["capture"], "temperatures": []},
        "source": first["source"],
    }
    writer = StoreWriter(
        out,
        codec=codec,
        backend=backend or first["backend"],
        metadata=metadata,
        vocab_size=vocab,
        storage_options=storage_options if out_storage_options is None else out_storage_options,
        compression_level=compression_level,
    )
    for j in range(opened[0].num_shards):
        docs = _read_shard(opened[0], j)
        others = [lk.get_many([doc.doc_id for doc in docs]) for lk in lookups[1:]]
        mixed = [
            _mix_document([doc, *(o[i] for o in others)], w, vocab, codec)
            for i, doc in enumerate(docs)
        ]
        writer.write_shard(j, mixed)
        if on_shard is not None:
            on_shard(j)
    return writer.finalize(opened[0].num_shards)


def union_sizes(supports: Sequence[np.ndarray]) -> np.ndarray:
    """Distinct valid ids per row over several ``(P, K_a)`` id arrays (``-1`` pads): ``(P,)``."""
    ids = np.sort(np.concatenate(supports, axis=1), axis=1)
    new = np.ones(ids.shape, dtype=bool)
    new[:, 1:] = ids[:, 1:] != ids[:, :-1]
    return (new & (ids >= 0)).sum(axis=1)


def _largest_union(stores: Sequence[LogitStore], lookups: Sequence[_Lookup]) -> int:
    """The largest union of the stores' supports at any position (a pass over every store).

    Sizing the output's ``k`` by it keeps estimated tokens out of the support wherever the
    union is that large; smaller unions are topped up with the most probable estimated tokens.
    """
    largest = 1
    for j in range(stores[0].num_shards):
        docs = _read_shard(stores[0], j)
        others = [lk.get_many([doc.doc_id for doc in docs]) for lk in lookups[1:]]
        for i, doc in enumerate(docs):
            parts = [doc.support_ids, *(o[i].support_ids for o in others)]
            if len(doc.label_logprob):
                largest = max(largest, int(union_sizes(parts).max()))
    return min(largest, stores[0].vocab_size)
