"""Documents as the teacher pass hands them to the writer: :class:`EncodedDocument`, the checks
that they fit the codec and the vocabulary, and their concatenation into one shard's arrays."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from logitstore.codecs.base import Codec, FieldSpec
from logitstore.errors import DataError
from logitstore.storage.base import ShardArrays


@dataclass
class EncodedDocument:
    """One document as the teacher pass hands it to the writer.

    Attributes:
        doc_id: content key (source row id, window, hash of the token ids).
        input_ids: integer ``(T,)``, every id in ``[0, vocab_size)``, ``T >= 1``.
        loss_mask: bool ``(T - 1,)``.
        fields: the codec's arrays for the ``T - 1`` positions, each ``(T - 1, *spec.shape)``
            with exactly the dtype ``codec.fields()`` declares.
    """

    doc_id: str
    input_ids: np.ndarray
    loss_mask: np.ndarray
    fields: dict[str, np.ndarray]


def field_specs(
    doc: EncodedDocument, codec: Codec, vocab_size: int, temperatures: Sequence[float]
) -> tuple[int, dict[str, FieldSpec]]:
    """The exact field specs every document must match, and the number of extra temperatures.

    The number of temperatures is the width of the document's ``tail_logsumexp`` (0 without
    one); it must be the number of ``temperatures``, which name the columns.
    """
    where = f"document {doc.doc_id!r}"
    lse = doc.fields.get("tail_logsumexp")
    lse_shape = tuple(np.shape(lse)) if lse is not None else ()
    n = int(lse_shape[1]) if len(lse_shape) == 2 else 0
    hint = len(temperatures)
    if n != hint:
        found = "no tail_logsumexp" if lse is None else f"tail_logsumexp of shape {lse_shape}"
        raise DataError(
            f"{where}: the store's temperatures {temperatures} are {hint} extra "
            f"temperature(s), so tail_logsumexp must have {hint} column(s) (none when 0); "
            f"found {found}"
        )
    specs = codec.fields(vocab_size, n)
    expected = {name: spec.shape for name, spec in specs.items()}
    found_shapes = {name: tuple(np.shape(v))[1:] for name, v in doc.fields.items()}
    if found_shapes != expected:
        missing = sorted(set(expected) - set(found_shapes))
        unexpected = sorted(set(found_shapes) - set(expected))
        wrong = {
            k: found_shapes[k]
            for k in sorted(set(expected) & set(found_shapes))
            if found_shapes[k] != expected[k]
        }
        raise DataError(
            f"{where}: fields do not fit the codec {codec.name} with {n} extra "
            f"temperature(s): missing {missing}, unexpected {unexpected}, wrong per-position "
            f"shape {wrong}; expected {expected} (per position)"
        )
    return n, specs


def check_document(doc: EncodedDocument, specs: Mapping[str, FieldSpec], vocab_size: int) -> None:
    where = f"document {doc.doc_id!r}"
    if not isinstance(doc.doc_id, str):
        raise DataError(f"doc_id must be a str, found {type(doc.doc_id).__name__}")
    ids, mask = np.asarray(doc.input_ids), np.asarray(doc.loss_mask)
    if ids.ndim != 1 or ids.dtype.kind not in "iu" or ids.shape[0] < 1:
        raise DataError(
            f"{where}: input_ids must be integer (T,) with T >= 1, found {ids.dtype} {ids.shape}"
        )
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise DataError(
            f"{where}: token ids must lie in [0, {vocab_size}), found [{ids.min()}, {ids.max()}]"
        )
    t = ids.shape[0]
    if mask.shape != (t - 1,) or mask.dtype != np.bool_:
        raise DataError(
            f"{where}: loss_mask must be bool ({t - 1},), found {mask.dtype} {mask.shape}"
        )
    if set(doc.fields) != set(specs):
        raise DataError(f"{where}: fields {sorted(doc.fields)}, expected {sorted(specs)}")
    for name, spec in specs.items():
        arr = np.asarray(doc.fields[name])
        if arr.shape != (t - 1, *spec.shape) or arr.dtype != np.dtype(spec.dtype):
            raise DataError(
                f"{where}: field {name!r} is {arr.dtype} {arr.shape}, "
                f"expected {spec.dtype} {(t - 1, *spec.shape)}"
            )


def concatenate(
    documents: Sequence[EncodedDocument], specs: Mapping[str, FieldSpec]
) -> ShardArrays:
    lengths = np.array([len(d.input_ids) for d in documents], dtype=np.int64)
    offsets = np.zeros(len(documents) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return ShardArrays(
        doc_ids=[d.doc_id for d in documents],
        offsets=offsets,
        input_ids=np.concatenate([np.asarray(d.input_ids, dtype=np.int64) for d in documents]),
        loss_mask=np.concatenate([np.asarray(d.loss_mask) for d in documents]),
        fields={n: np.concatenate([np.asarray(d.fields[n]) for d in documents]) for n in specs},
    )
