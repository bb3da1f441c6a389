"""Data for the teacher pass: tokenize rows, split them into windows, key them.

Rows come from :func:`logitstore.pipelines._sources.load_rows` (every source ``datasets`` reads).

Windowing policy (``make_windows``): a document of ``n <= max_length`` tokens is one window. A
longer one is cut into windows of ``max_length`` tokens that start every ``max_length - 1``
tokens, so consecutive windows share one token and every next-token position of the document
(``t`` predicts ``t + 1``) lies in exactly one window. Each window is computed in isolation: its
own sequence in the batch, right-padded, with an attention mask, so the teacher sees only the
window's tokens (context restarts at each window). With windowing off, a document longer than
``max_length`` raises :class:`DataError` naming it. Documents of fewer than two tokens have no
next-token position and are skipped.

Document ids are keyed by content: ``{row_id}/w{window}/{hash}``, where ``row_id`` names the
source row (see :class:`logitstore.pipelines._sources.RowIds`), and ``hash`` is the first 16 hex digits of
the SHA-256 of the window's token ids as little-endian int64.

Tokenizing and windowing run in ``datasets.Dataset.map`` (``num_proc`` processes), whose result
is cached under a fingerprint of everything that changes the tokens (:func:`windows_fingerprint`):
a resumed run, or another rank of the same run, reads the cache instead of tokenizing again.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from logitstore.errors import ConfigError, DataError, LogitstoreError
from logitstore.pipelines._sources import RowIds, Source
from logitstore.pipelines._sources import (
    load_rows as load_rows,  # re-exported: the data API in one place
)

WINDOWING_POLICY = (
    "windows of max_length tokens with stride max_length-1 (one shared token), each next-token "
    "position in exactly one window; documents shorter than 2 tokens skipped"
)
ISOLATION = "one window per sequence, right padding with an attention mask"
# Bumped whenever tokenizing or windowing changes, so old cached windows are not reused.
_WINDOWS_VERSION = 5


@dataclass
class Window:
    """One unit the teacher sees and the store keeps: a document or a window of one.

    Attributes:
        doc_id: content key ``{row_id}/w{window}/{hash}``.
        input_ids: int64 ``(T,)``, ``2 <= T <= max_length``.
        loss_mask: bool ``(T - 1,)``; position ``t`` (predicting ``input_ids[t + 1]``) is trained.
    """

    doc_id: str
    input_ids: np.ndarray
    loss_mask: np.ndarray

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])


def tokenize_text(tokenizer: Any, text: str) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of plain text and the per-token label flags (all trained).

    Returns:
        ``(ids, trained)``: int64 ``(n,)`` and bool ``(n,)``; ``trained[t]`` says whether token
        ``t`` is a training label (the loss mask is ``trained[1:]``).
    """
    # verbose=False: no "longer than the maximum sequence length" alarm, the windows see to it
    ids = np.asarray(
        tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"], dtype=np.int64
    )
    return ids, np.ones(ids.shape, dtype=bool)


def _render(tokenizer: Any, messages: Sequence[Mapping[str, Any]], generation: bool) -> str:
    return str(
        tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=generation
        )
    )


def _opening(tokenizer: Any, text: str) -> str:
    """What a template writes before the content of a conversation's first message, when that
    message is the assistant's: a default system prompt and the assistant's header, say (an empty
    conversation renders neither, in templates that write the default system prompt in their
    loop over the messages). Found as the common start of two renderings that differ in that
    content alone; "" when it is not the start of ``text``."""
    try:
        one, other = (
            _render(tokenizer, [{"role": "assistant", "content": c}], generation=False)
            for c in ("a", "b")
        )
    except Exception:  # noqa: BLE001 - a template may refuse a lone reply; then none is known
        return ""
    common = os.path.commonprefix([one, other])
    return common if text.startswith(common) else ""


def assistant_spans(tokenizer: Any, messages: Sequence[Mapping[str, Any]]) -> tuple[str, list]:
    """Render a chat and locate each assistant turn by incremental templating.

    Turn ``i``'s span runs from the end of ``render(messages[:i], add_generation_prompt=True)``
    to the end of ``render(messages[:i + 1])``: the reply and the template's end-of-turn text.
    A first message of the assistant starts after what the template writes before it
    (:func:`_opening`), not at the start of the text.
    This needs no template markers, only that rendering a prefix of the chat gives a prefix of
    the text, which is checked.

    Returns:
        ``(text, spans)``: the full rendering and a list of ``(start, end)`` character spans.

    Raises:
        DataError: the template does not render prefixes as prefixes.
    """
    text = _render(tokenizer, messages, generation=False)
    spans = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        head = _render(tokenizer, messages[:i], generation=True) if i else _opening(tokenizer, text)
        upto = _render(tokenizer, messages[: i + 1], generation=False)
        if not (text.startswith(upto) and upto.startswith(head)):
            raise DataError(
                "the chat template does not render a prefix of the conversation as a prefix of "
                f"the text (turn {i}); assistant-only loss masks cannot be located"
            )
        spans.append((len(head), len(upto)))
    return text, spans


def tokenize_chat(
    tokenizer: Any, messages: Sequence[Mapping[str, Any]]
) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of a chat rendered with the tokenizer's template; only assistant turns trained.

    A token is a trained label when its first character lies in an assistant span (see
    :func:`assistant_spans`).

    Returns:
        ``(ids, trained)``: int64 ``(n,)`` and bool ``(n,)``.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError("chat data needs a fast tokenizer (character offsets) for its loss mask")
    if getattr(tokenizer, "chat_template", None) is None:
        raise ConfigError("--messages-field needs a teacher tokenizer with a chat template")
    text, spans = assistant_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    ids = np.asarray(enc["input_ids"], dtype=np.int64)
    starts = np.asarray([s for s, _ in enc["offset_mapping"]], dtype=np.int64).reshape(-1)
    trained = np.zeros(ids.shape, dtype=bool)
    for lo, hi in spans:
        trained |= (starts >= lo) & (starts < hi)
    return ids, trained


def doc_id(row_id: str, window: int, ids: np.ndarray) -> str:
    """Content key of a window: source row, window index, hash of its token ids."""
    digest = hashlib.sha256(np.ascontiguousarray(ids, dtype="<i8").tobytes()).hexdigest()[:16]
    return f"{row_id}/w{window}/{digest}"


def make_windows(
    row_id: str, ids: np.ndarray, trained: np.ndarray, *, max_length: int, windowing: bool = True
) -> list[Window]:
    """Split one tokenized document by the module's windowing policy.

    Args:
        row_id: source row id, used in doc ids and error messages.
        ids: int64 ``(n,)`` token ids.
        trained: bool ``(n,)`` label flags (see :func:`tokenize_text`).
        max_length: most tokens in one window (>= 2).
        windowing: when ``False``, a document longer than ``max_length`` is an error.

    Raises:
        DataError: windowing is off and the document is too long.
    """
    n = int(ids.shape[0])
    if n < 2:
        return []
    if n > max_length and not windowing:
        raise DataError(
            f"document {row_id!r} has {n} tokens, more than max_length={max_length}, and "
            "windowing is off"
        )
    stride = max_length - 1
    windows = []
    for j, start in enumerate(range(0, n - 1, stride)):
        w_ids = ids[start : start + max_length]
        windows.append(
            Window(
                doc_id=doc_id(row_id, j, w_ids),
                input_ids=np.ascontiguousarray(w_ids, dtype=np.int64),
                loss_mask=np.ascontiguousarray(trained[start + 1 : start + max_length]),
            )
        )
    return windows


# -- windows through datasets.map --------------------------------------------------------------


def tokenizer_key(tokenizer: Any) -> str:
    """A hash of everything in ``tokenizer`` that changes token ids or the chat rendering."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a slow tokenizer: let datasets hash the whole object
        from datasets.fingerprint import Hasher

        return str(Hasher.hash(tokenizer))
    parts = {
        "class": type(tokenizer).__name__,
        "backend": backend.to_str(),  # vocabulary, normalizer, pre- and post-processing
        "chat_template": getattr(tokenizer, "chat_template", None),
        "special": {k: str(v) for k, v in tokenizer.special_tokens_map.items()},
        "added": sorted(tokenizer.get_added_vocab().items()),
        "bos_eos": [getattr(tokenizer, k, None) for k in ("add_bos_token", "add_eos_token")],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def windows_fingerprint(source: Source, tokenizer: Any, **settings: Any) -> str:
    """The cache key of a source's windows: the rows, the tokenizer, the settings.

    The row ids need no key of their own: they follow from the source's files (names and
    contents, in ``source.metadata``'s fingerprint) and this module's version.
    """
    key = {
        "version": _WINDOWS_VERSION,
        "rows": getattr(source.dataset, "_fingerprint", None),
        "source": source.metadata,
        "tokenizer": tokenizer_key(tokenizer),
        **settings,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _check_messages(row_id: str, field: str, messages: list[Any]) -> None:
    """Refuse a conversation no template renders faithfully: empty, or a message that is not
    a mapping, has no role, or has no content (which templates render as "None" or nothing)."""
    if not messages:
        raise DataError(
            f"row {row_id!r}: {field!r} is an empty conversation; expected at least one message"
        )
    for j, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise DataError(
                f"row {row_id!r}: message {j} of {field!r} is {type(message).__name__}, "
                "expected a mapping with 'role' and 'content'"
            )
        role = message.get("role")
        if not isinstance(role, str) or not role.strip():
            raise DataError(
                f"row {row_id!r}: message {j} of {field!r} has no role (found {role!r}); "
                "expected e.g. 'user' or 'assistant'"
            )
        if message.get("content") is None and not message.get("tool_calls"):
            raise DataError(f"row {row_id!r}: message {j} of {field!r} ({role}) has no content")


def without_nulls(value: Any) -> Any:
    """``value`` with every mapping's null entries left out, at any depth.

    Arrow stores a column of messages as one struct type, the union of every message's keys,
    so rows read from Parquet or the Hub give each message, and each tool call in it, every
    key any of them has, ``None`` where it had none: a call written with arguments
    ``{"city": "Paris"}`` reads back as ``{"city": "Paris", "query": None}`` and a template
    renders ``{"city": "Paris", "query": null}``. ``apply_chat_template`` drops a message's
    own null keys, not nested ones; this drops both, handing over the messages as written.
    """
    if isinstance(value, Mapping):
        return {k: without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_nulls(v) for v in value]
    return value


def _text_parts(
    tokenizer: Any, row_id: str, field: str, messages: list[Mapping[str, Any]]
) -> list[Mapping[str, Any]]:
    """``messages`` with content given as parts (``[{"type": "text", "text": ...}]``, OpenAI's
    form) made strings, where the template does not read parts: most text models' templates
    write such a list as its Python repr (``[{'type': 'text', ...}]``), or fail on it.

    Several text parts are joined by a newline (as vLLM does). A template that reads parts
    itself renders them as they are.

    Raises:
        DataError: a part other than text, which such a template cannot render.
    """
    listed = [j for j, m in enumerate(messages) if isinstance(m.get("content"), list)]
    if not listed:
        return messages
    try:
        text = _render(tokenizer, messages, generation=False)
        if not any(str(messages[j]["content"]) in text for j in listed):
            return messages  # the template reads the parts
    except Exception:  # noqa: BLE001 - a template raises whatever it likes on a list
        pass
    flat = list(messages)
    for j in listed:
        parts = messages[j]["content"]
        if not all(isinstance(p, Mapping) and p.get("type") == "text" for p in parts):
            kinds = sorted({str(p.get("type")) if isinstance(p, Mapping) else "?" for p in parts})
            raise DataError(
                f"row {row_id!r}: message {j} of {field!r} has parts of types {kinds}; the chat "
                "template reads text alone (a string, or parts of type 'text')"
            )
        flat[j] = {**messages[j], "content": "\n".join(str(p.get("text", "")) for p in parts)}
    return flat


def _tokenize_row(tokenizer: Any, row_id: str, field: str, value: Any, chat: bool) -> tuple:
    if value is None:
        raise DataError(f"row {row_id!r} has no field {field!r} (missing or null)")
    if chat:
        if not isinstance(value, list):
            raise DataError(f"row {row_id!r}: {field!r} must be a list of messages")
        value = [without_nulls(m) for m in value]
        _check_messages(row_id, field, value)
        try:
            return tokenize_chat(tokenizer, _text_parts(tokenizer, row_id, field, value))
        except LogitstoreError:
            raise
        except Exception as exc:  # noqa: BLE001 - a template raises whatever it likes
            message = " ".join(str(exc).split()) or type(exc).__name__
            raise DataError(
                f"row {row_id!r}: the chat template cannot render it: {message}"
            ) from None
    if not isinstance(value, str):
        raise DataError(f"row {row_id!r}: {field!r} must be a string")
    return tokenize_text(tokenizer, value)


def _windows_batch(
    batch: Mapping[str, list[Any]],
    indices: list[int],
    *,
    tokenizer: Any,
    field: str,
    chat: bool,
    row_ids: RowIds,
    max_length: int,
    windowing: bool,
) -> dict[str, list[Any]]:
    """``datasets.map`` function: rows in, their windows out (one row per window)."""
    out: dict[str, list[Any]] = {"doc_id": [], "input_ids": [], "loss_mask": []}
    if field not in batch:
        raise DataError(f"the rows have no field {field!r}; found {sorted(batch)}")
    for value, index in zip(batch[field], indices):
        row_id = row_ids(index)
        ids, trained = _tokenize_row(tokenizer, row_id, field, value, chat)
        for w in make_windows(row_id, ids, trained, max_length=max_length, windowing=windowing):
            out["doc_id"].append(w.doc_id)
            out["input_ids"].append(w.input_ids)
            out["loss_mask"].append(w.loss_mask)
    return out


def _from_table(table: Any) -> Iterable[Window]:
    """Windows from an Arrow table of the map's output.

    The token ids are read-only views of the table, which is the memory-mapped cache file, so
    the windows of every rank share the page cache instead of each holding a copy (8 bytes a
    token: 8 GB a rank for a billion tokens); only the loss masks (bit-packed) are unpacked.
    """
    for batch in table.to_batches():
        ids, mask = batch.column("input_ids"), batch.column("loss_mask")
        id_values = np.asarray(ids.values.to_numpy(zero_copy_only=False), dtype=np.int64)
        mask_values = np.array(mask.values.to_numpy(zero_copy_only=False), dtype=bool)
        id_offsets, mask_offsets = ids.offsets.to_numpy(), mask.offsets.to_numpy()
        for k, key in enumerate(batch.column("doc_id").to_pylist()):
            yield Window(
                doc_id=key,
                input_ids=id_values[id_offsets[k] : id_offsets[k + 1]],
                loss_mask=mask_values[mask_offsets[k] : mask_offsets[k + 1]],
            )


def source_field(source: Source, text_field: str | None, messages_field: str | None) -> str:
    """The field the pass reads (``messages_field`` or else ``text_field``), checked against the
    source's columns where they are known (a stream may not know them before its first row).

    Raises:
        ConfigError: no field named.
        DataError: the rows have no such field, listing the fields they have.
    """
    field = messages_field or text_field
    if not field:
        raise ConfigError("name a --text-field or a --messages-field")
    columns = source.dataset.column_names
    if columns is not None and field not in columns:
        chats = [c for c in columns if _holds_messages(source.dataset.features, c)]
        if chats and not messages_field:
            hint = f"; for chat messages give --messages-field {chats[0]}"
        else:
            hint = f"; give the field with --{'messages' if messages_field else 'text'}-field"
        raise DataError(
            f"{source.metadata.get('name')}: no field {field!r}; found {sorted(columns)}{hint}"
        )
    return field


def _holds_messages(features: Any, column: str) -> bool:
    """Whether ``column`` is declared a list of records with a ``role`` (chat messages)."""
    feature = features.get(column) if features else None
    inner = getattr(feature, "feature", None)  # datasets' List / Sequence
    if inner is None and isinstance(feature, list) and len(feature) == 1:
        inner = feature[0]  # older datasets: [{"role": ..., "content": ...}]
    return isinstance(inner, dict) and "role" in inner


def build_windows(
    source: Source,
    tokenizer: Any,
    *,
    max_length: int,
    text_field: str | None = "text",
    messages_field: str | None = None,
    windowing: bool = True,
    num_proc: int | None = None,
    cache_dir: str | None = None,
) -> list[Window]:
    """Tokenize every row of ``source`` and split it into windows, in source order.

    Runs as a cached ``datasets.map`` (``num_proc`` processes): the windows are written to
    ``{cache_dir}/logitstore-windows/{fingerprint}.arrow`` and read back from there by any later
    call with the same rows, tokenizer and settings. A streamed source is not cached.

    Raises:
        ConfigError: ``max_length < 2``, or no field named.
        DataError: the rows lack the field, or no row yields a window.
    """
    import datasets

    if max_length < 2:
        raise ConfigError(f"max_length must be at least 2, found {max_length}")
    field = source_field(source, text_field, messages_field)
    ds = source.dataset
    columns = ds.column_names
    settings = {"max_length": max_length, "windowing": windowing, "field": field,
                "chat": bool(messages_field)}  # fmt: skip
    features = datasets.Features(
        doc_id=datasets.Value("string"),
        input_ids=datasets.Sequence(datasets.Value("int64")),
        loss_mask=datasets.Sequence(datasets.Value("bool")),
    )
    args: dict[str, Any] = {
        "batched": True,
        "with_indices": True,
        "remove_columns": columns,
        "features": features,
        "fn_kwargs": {"tokenizer": tokenizer, "row_ids": source.row_ids, **settings},
    }
    if isinstance(ds, datasets.IterableDataset):
        windows = [
            Window(
                r["doc_id"], np.asarray(r["input_ids"], np.int64), np.asarray(r["loss_mask"], bool)
            )
            for r in ds.map(_windows_batch, **args)
        ]
    else:
        fingerprint = windows_fingerprint(source, tokenizer, **settings)
        folder = Path(cache_dir or datasets.config.HF_DATASETS_CACHE) / "logitstore-windows"
        folder.mkdir(parents=True, exist_ok=True)
        mapped = ds.map(
            _windows_batch, **args, num_proc=num_proc, new_fingerprint=fingerprint,
            cache_file_name=str(folder / f"{fingerprint}.arrow"), load_from_cache_file=True,
            desc="tokenizing",
        )  # fmt: skip
        windows = list(_from_table(mapped.with_format("arrow")[:]))
    if not windows:
        raise DataError("no document has two or more tokens; nothing to compute")
    if messages_field and not any(w.loss_mask.any() for w in windows):
        raise DataError(
            f"no conversation in {field!r} has an assistant turn to train on (every loss mask "
            "is empty); expected messages with role 'assistant', rendered by the chat template"
        )
    return windows
