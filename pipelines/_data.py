"""Data for the teacher pass: load rows, tokenize them, split them into windows, key them.

Sources (``load_rows``): a local ``.txt`` file or directory of them (one document per file), a
``.jsonl`` or ``.parquet`` file or directory of them, a dataset saved with
``datasets.Dataset.save_to_disk``, or a Hub dataset id with a split.

Windowing policy (``make_windows``): a document of ``n <= max_length`` tokens is one window. A
longer one is cut into windows of ``max_length`` tokens that start every ``max_length - 1``
tokens, so consecutive windows share one token and every next-token position of the document
(``t`` predicts ``t + 1``) lies in exactly one window. Each window is computed in isolation: its
own sequence in the batch, right-padded, with an attention mask, so the teacher sees only the
window's tokens (context restarts at each window). With windowing off, a document longer than
``max_length`` raises :class:`DataError` naming it. Documents of fewer than two tokens have no
next-token position and are skipped.

Document ids are keyed by content: ``{row_id}/w{window}/{hash}``, where ``row_id`` names the
source row (``file:line`` or the dataset row index), and ``hash`` is the first 16 hex digits of
the SHA-256 of the window's token ids as little-endian int64.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from logitstore.errors import ConfigError, DataError

WINDOWING_POLICY = (
    "windows of max_length tokens with stride max_length-1 (one shared token), each next-token "
    "position in exactly one window; documents shorter than 2 tokens skipped"
)
ISOLATION = "one window per sequence, right padding with an attention mask"

_SUFFIXES = (".txt", ".jsonl", ".parquet")


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


@dataclass
class Source:
    """Rows loaded from ``--data`` and the metadata describing where they came from.

    Attributes:
        rows: list of ``(row_id, record)`` in a stable order.
        metadata: ``{"name", "kind", "fingerprint", "split"}``; nothing machine-specific.
    """

    rows: list[tuple[str, Mapping[str, Any]]]
    metadata: dict[str, Any]


def _hash_files(root: Path, files: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(root) if f != root else f.name).encode() + b"\0")
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _read_file(path: Path, row_prefix: str) -> Iterator[tuple[str, Mapping[str, Any]]]:
    if path.suffix == ".txt":
        yield row_prefix, {"text": path.read_text(encoding="utf-8")}
    elif path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{row_prefix}:{lineno} is not valid JSON: {exc}") from None
                if not isinstance(record, dict):
                    raise DataError(f"{row_prefix}:{lineno}: expected a JSON object per line")
                yield f"{row_prefix}:{lineno}", record
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, record in enumerate(pq.read_table(path).to_pylist()):
            yield f"{row_prefix}:{i}", record


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and (
        (path / "dataset_info.json").exists()
        or (path / "state.json").exists()
        or (path / "dataset_dict.json").exists()
    )


def _load_saved_or_hub(data: str, split: str, local: bool) -> Source:
    import datasets

    if local:
        ds: Any = datasets.load_from_disk(data)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"{data} has splits {sorted(ds)}, not {split!r}")
            ds = ds[split]
        name, kind = Path(data).name, "saved_dataset"
    else:
        try:
            ds = datasets.load_dataset(data, split=split)
        except FileNotFoundError as exc:
            raise DataError(f"no local path or Hub dataset {data!r}: {exc}") from None
        name, kind = data, "hub"
    rows = [(str(i), record) for i, record in enumerate(ds)]
    meta = {"name": name, "kind": kind, "fingerprint": ds._fingerprint, "split": split}
    return Source(rows=rows, metadata=meta)


def load_rows(data: str, *, split: str = "train", limit: int | None = None) -> Source:
    """Load every row of a data source in a stable order.

    Args:
        data: local file or directory, a ``save_to_disk`` directory, or a Hub dataset id.
        split: split of a Hub dataset or a saved ``DatasetDict``.
        limit: keep only the first ``limit`` rows.

    Raises:
        DataError: no rows, an unsupported file type, or malformed rows.
    """
    path = Path(data)
    if path.exists() and not _is_saved_dataset(path):
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in _SUFFIXES)
            root = path
        else:
            files, root = [path], path
        if not files or any(f.suffix not in _SUFFIXES for f in files):
            raise DataError(f"{data}: expected {', '.join(_SUFFIXES)} files, found none usable")
        rows: list[tuple[str, Mapping[str, Any]]] = []
        for f in files:
            prefix = f.name if root == f else str(f.relative_to(root).as_posix())
            rows.extend(_read_file(f, prefix))
        meta = {
            "name": path.name,
            "kind": "files",
            "fingerprint": _hash_files(root, files),
            "split": None,
        }
        source = Source(rows=rows, metadata=meta)
    else:
        source = _load_saved_or_hub(data, split, local=path.exists())
    if limit is not None:
        source.rows = source.rows[:limit]
    if not source.rows:
        raise DataError(f"{data}: the data source is empty (expected at least one row)")
    return source


def tokenize_text(tokenizer: Any, text: str) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of plain text and the per-token label flags (all trained).

    Returns:
        ``(ids, trained)``: int64 ``(n,)`` and bool ``(n,)``; ``trained[t]`` says whether token
        ``t`` is a training label (the loss mask is ``trained[1:]``).
    """
    ids = np.asarray(tokenizer(text, add_special_tokens=True)["input_ids"], dtype=np.int64)
    return ids, np.ones(ids.shape, dtype=bool)


def _render(tokenizer: Any, messages: Sequence[Mapping[str, Any]], generation: bool) -> str:
    return str(
        tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=generation
        )
    )


def assistant_spans(tokenizer: Any, messages: Sequence[Mapping[str, Any]]) -> tuple[str, list]:
    """Render a chat and locate each assistant turn by incremental templating.

    Turn ``i``'s span runs from the end of ``render(messages[:i], add_generation_prompt=True)``
    to the end of ``render(messages[:i + 1])``: the reply and the template's end-of-turn text.
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
        head = _render(tokenizer, messages[:i], generation=True) if i else ""
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
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
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


def build_windows(
    source: Source,
    tokenizer: Any,
    *,
    max_length: int,
    text_field: str | None = "text",
    messages_field: str | None = None,
    windowing: bool = True,
) -> list[Window]:
    """Tokenize every row of ``source`` and split it into windows, in source order.

    Raises:
        ConfigError: ``max_length < 2``.
        DataError: a row lacks the field, or no row yields a window.
    """
    if max_length < 2:
        raise ConfigError(f"max_length must be at least 2, found {max_length}")
    field = messages_field or text_field
    if not field:
        raise ConfigError("name a --text-field or a --messages-field")
    windows: list[Window] = []
    for row_id, record in source.rows:
        if field not in record:
            raise DataError(f"row {row_id!r} has no field {field!r}; found {sorted(record)}")
        value = record[field]
        if messages_field:
            if not isinstance(value, list):
                raise DataError(f"row {row_id!r}: {field!r} must be a list of messages")
            ids, trained = tokenize_chat(tokenizer, value)
        else:
            if not isinstance(value, str):
                raise DataError(f"row {row_id!r}: {field!r} must be a string")
            ids, trained = tokenize_text(tokenizer, value)
        windows.extend(
            make_windows(row_id, ids, trained, max_length=max_length, windowing=windowing)
        )
    if not windows:
        raise DataError("no document has two or more tokens; nothing to compute")
    return windows
