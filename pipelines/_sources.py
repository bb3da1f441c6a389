"""Data sources of the teacher pass, read by ``datasets``, each row with a stable id.

Sources (:func:`load_rows`): a local file (JSON or JSON lines, CSV or TSV, Parquet, Arrow or
text, optionally compressed: ``.jsonl.gz``), a local folder of them laid out as on the Hub (its
``README.md`` configs and its split file names are respected: a folder with ``train-*.parquet``
and ``test-*.parquet`` has two splits), a dataset saved with ``datasets.Dataset.save_to_disk``,
or a Hub dataset id with a subset (config) and a revision, optionally streamed. A text file is
one document (as it always was), not one document per line.

Every row has an id (:class:`RowIds`) that names where it came from; the teacher pass keys its
documents by it, so the ids of the formats read before ``datasets`` did the reading are those
the old readers gave (stores made then resume unchanged).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from logitstore.errors import ConfigError, DataError

# datasets' builder for each file suffix we read; ``.tsv`` is CSV with tabs.
FORMATS = {
    ".json": "json", ".jsonl": "json", ".ndjson": "json", ".csv": "csv", ".tsv": "csv",
    ".parquet": "parquet", ".arrow": "arrow", ".txt": "text",
}  # fmt: skip
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
_JSON_LINES = (".jsonl", ".ndjson")


@dataclass(frozen=True)
class RowIds:
    """The id of each row of a source, from its index in the split.

    Rows of local files are named by file (relative to ``--data``): ``{file}:{line}`` (1-based,
    blank lines counted) for JSON lines, ``{file}`` for a text file (one document), and
    ``{file}:{index}`` (0-based, within the file) for the other formats. Rows of a saved or Hub
    dataset, and of a folder of several CSV or JSON (not JSON lines) files, whose per-file row
    counts would need a second parse, are named by their index in the split.

    Attributes:
        files: file names, in the order ``datasets`` reads them (empty: name rows by index).
        starts: index of each file's first row.
        lines: per file, the line number of each row (JSON lines), or ``None``.
        whole: per file, whether it is one document named by the file alone (text).
    """

    files: tuple[str, ...] = ()
    starts: tuple[int, ...] = ()
    lines: tuple[tuple[int, ...] | None, ...] = ()
    whole: tuple[bool, ...] = ()

    def __call__(self, index: int) -> str:
        if not self.files:
            return str(index)
        f = bisect.bisect_right(self.starts, index) - 1
        if self.whole[f]:
            return self.files[f]
        lines, j = self.lines[f], index - self.starts[f]
        return f"{self.files[f]}:{lines[j] if lines is not None else j}"


@dataclass
class Source:
    """Rows loaded from ``--data`` and the metadata describing where they came from.

    Attributes:
        dataset: a ``datasets.Dataset`` (or ``IterableDataset`` when streamed), in source order.
        row_ids: the row id of each row index.
        metadata: ``{"name", "kind", "fingerprint", "split"}``, plus ``subset`` and
            ``revision`` when given; nothing machine-specific.
    """

    dataset: Any
    row_ids: RowIds = field(default_factory=RowIds)
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def rows(self) -> list[tuple[str, Mapping[str, Any]]]:
        """Every ``(row_id, record)``, in order (reads the whole source into memory)."""
        return [(self.row_ids(i), record) for i, record in enumerate(self.dataset)]


# -- loading -----------------------------------------------------------------------------------


def _suffixes(path: Path) -> tuple[str, str | None]:
    """``(format suffix, compression suffix or None)`` of a file name, lower-cased."""
    suffixes = [s.lower() for s in path.suffixes]
    compression = suffixes.pop() if suffixes and suffixes[-1] in COMPRESSIONS else None
    return (suffixes[-1] if suffixes else ""), compression


def _unusable(data: str, found: str) -> DataError:
    known = ", ".join(sorted({*FORMATS, ".jsonl.gz"}))
    return DataError(f"{data}: expected {known} files, found none usable ({found})")


def _hash_files(root: Path, files: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(root) if f != root else f.name).encode() + b"\0")
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(number, text)`` of each line of a local file (1-based; decompressed as named).

    Raises:
        DataError: a line that is not UTF-8, named by file and line (``datasets`` and Python
            would only name a byte offset, in a traceback).
    """
    import fsspec

    with fsspec.open(str(path), "rb", compression="infer") as f:
        for n, raw in enumerate(f, start=1):
            try:
                yield n, raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(
                    f"{path.name}:{n} is not UTF-8 text (byte {raw[exc.start]:#04x} at column "
                    f"{exc.start + 1}); expected UTF-8, e.g. re-encode with iconv -t UTF-8"
                ) from None


def _json_lines(path: Path) -> list[int]:
    """1-based numbers of the non-blank lines of a JSON lines file (one row each)."""
    return [n for n, line in _lines(path) if line.strip()]


def _bad_json_line(path: Path) -> str | None:
    """``file:line: error`` of a JSON lines file's first line that is not a JSON object."""
    for n, line in _lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            return f"{path.name}:{n} is not valid JSON: {exc}"
        if not isinstance(record, dict):
            return f"{path.name}:{n}: expected a JSON object per line"
    return None


def _is_empty(path: Path) -> bool:
    return not any(line.strip() for _, line in _lines(path))


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and (
        (path / "dataset_info.json").exists()
        or (path / "state.json").exists()
        or (path / "dataset_dict.json").exists()
    )


def _builder(data: str, path: str, subset: str | None, **kwargs: Any) -> Any:
    """A ``datasets`` builder of a known format; a text one reads each file as one document."""
    import datasets
    from datasets.data_files import EmptyDatasetError

    try:
        builder = datasets.load_dataset_builder(path, name=subset, **kwargs)
        if builder.name == "text" and getattr(builder.config, "sample_by", None) != "document":
            builder = datasets.load_dataset_builder(
                path, name=subset, sample_by="document", **kwargs
            )
    except EmptyDatasetError as exc:
        raise _unusable(data, str(exc)) from None
    except datasets.exceptions.DatasetNotFoundError as exc:
        raise DataError(f"no local path or Hub dataset {data!r}: {exc}") from None
    except ValueError as exc:
        if subset is not None and subset in str(exc):
            raise ConfigError(f"{data} has no subset {subset!r}: {exc}") from None
        raise DataError(f"{data}: {exc}") from None
    except (FileNotFoundError, ConnectionError) as exc:
        raise DataError(f"no local path or readable Hub dataset {data!r}: {exc}") from None
    if builder.name not in set(FORMATS.values()) and Path(path).exists():
        raise _unusable(data, f"datasets reads it as {builder.name!r}")
    return builder


def _split_files(builder: Any, data: str, split: str) -> list[Path]:
    """The split's local data files (none listed: a Hub dataset or a scripted builder)."""
    files = getattr(builder.config, "data_files", None) or {}
    name = split.split("[")[0]  # "train[:10%]" reads part of "train"
    if files and name not in files:
        raise DataError(f"{data} has splits {sorted(map(str, files))}, not {split!r}")
    return [Path(str(f)) for f in files.get(name, [])]


def _prepare(builder: Any, data: str, split: str, streaming: bool, num_proc: int | None) -> Any:
    """Read one split through the builder (what ``datasets.load_dataset`` does)."""
    if streaming:
        return builder.as_streaming_dataset(split=split)
    builder.download_and_prepare(num_proc=num_proc)
    try:
        return builder.as_dataset(split=split)
    except ValueError as exc:  # a split missing only once the data is read
        raise DataError(f"{data}: {exc}") from None


def _read_error(data: str, builder: str, files: Sequence[Path], exc: Exception) -> DataError:
    """The clearest error for data ``datasets`` failed to read: a bad line, no rows, or its own."""
    for f in files:
        try:
            if _suffixes(f)[0] in _JSON_LINES:
                bad = _bad_json_line(f)
                if bad:
                    return DataError(bad)
            elif builder in ("csv", "text", "json"):
                for _ in _lines(f):  # a line that is not UTF-8, by number
                    pass
        except DataError as error:
            return error
    if files and builder in ("json", "csv") and all(_is_empty(f) for f in files):
        return DataError(f"{data}: the data source is empty (expected at least one row)")
    cause = f" ({exc.__cause__})" if exc.__cause__ else ""
    return DataError(f"{data}: datasets could not read it: {exc}{cause}")


def _row_ids(builder: str, root: Path, files: Sequence[Path], rows: int | None) -> RowIds:
    """Per-file row ids of local files; by index where a file's row count is not cheap."""
    import pyarrow.parquet as pq

    names, starts, lines, whole = [], [], [], []
    total = 0
    for f in files:
        numbers = tuple(_json_lines(f)) if _suffixes(f)[0] in _JSON_LINES else None
        if builder == "text":
            count = 1
        elif builder == "parquet":
            count = pq.ParquetFile(f).metadata.num_rows
        elif numbers is not None:
            count = len(numbers)
        elif len(files) == 1:
            count = rows or 0
        else:
            return RowIds()  # several CSV or JSON files
        names.append(f.name if f == root else f.relative_to(root).as_posix())
        starts.append(total)
        lines.append(numbers)
        whole.append(builder == "text")
        total += count
    if rows is not None and total != rows:
        return RowIds()
    return RowIds(tuple(names), tuple(starts), tuple(lines), tuple(whole))


def _load_files(
    path: Path, data: str, split: str, subset: str | None, streaming: bool, opts: dict[str, Any]
) -> Source:
    """A local file or folder of files, through ``datasets``' builder for its format."""
    # datasets names the files by absolute path; the user may have given a relative one.
    path = Path(os.path.abspath(path))
    num_proc = opts.pop("num_proc", None)
    if path.is_file():
        fmt, _ = _suffixes(path)
        if fmt not in FORMATS:
            raise _unusable(data, repr(path.name))
        if subset is not None:
            raise ConfigError(f"--subset names a config of a folder or Hub dataset, not {data}")
        kwargs = {"sep": "\t"} if fmt == ".tsv" else {}
        if split.split("[")[0] != "train":
            raise ConfigError(
                f"--split {split!r}: {data} is one file, so one split, 'train' (a part of it "
                "reads as train[:1000] or train[:10%]; a folder of split files, e.g. "
                "train.jsonl and test.jsonl, has more)"
            )
        builder = _builder(data, FORMATS[fmt], None, data_files=[str(path)], **kwargs, **opts)
    else:
        builder = _builder(data, str(path), subset, **opts)
    files = _split_files(builder, data, split)
    if files and builder.name in ("json", "csv") and all(_is_empty(f) for f in files):
        raise DataError(f"{data}: the data source is empty (expected at least one row)")
    try:
        ds = _prepare(builder, data, split, streaming, num_proc)
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - datasets raises many kinds; all become DataError
        raise _read_error(data, builder.name, files, exc) from None
    splits = getattr(builder.config, "data_files", None) or {}
    metadata = {
        "name": path.name,
        "kind": "files",
        "fingerprint": _hash_files(path, sorted(files)),
        # A file or a flat folder has one split, no choice: recorded as None, as it always
        # was, unless only a part of it is read.
        "split": split if len(splits) > 1 or "[" in split else None,
        **({"subset": subset} if subset is not None else {}),
    }
    return Source(ds, _row_ids(builder.name, path, files, None if streaming else len(ds)), metadata)


def _load_saved(path: Path, data: str, split: str, streaming: bool) -> Source:
    """A ``save_to_disk`` folder: a ``DatasetDict`` by split, or one ``Dataset`` (split ``train``).

    A part of a split (``train[:10%]``, ``train[:100]+test[:100]``) is read as ``datasets``'
    split syntax reads it.
    """
    import datasets

    ds: Any = datasets.load_from_disk(str(path))
    splits = dict(ds) if isinstance(ds, datasets.DatasetDict) else {"train": ds}
    if any(name not in splits for name in _split_names(split)):
        hint = "" if isinstance(ds, datasets.DatasetDict) else " (one saved Dataset is one split)"
        raise DataError(f"{data} has splits {sorted(splits)}{hint}, not {split!r}")
    if split in splits:  # a whole split, whatever its name (datasets' syntax may not parse it)
        ds = splits[split]
    else:
        try:
            instruction = datasets.ReadInstruction.from_spec(split)
            parts = instruction.to_absolute({name: len(d) for name, d in splits.items()})
        except (AssertionError, ValueError) as exc:
            raise ConfigError(f"--split {split!r}: not a split or a part of one ({exc})") from None
        # A bound past the end reads to the end, as datasets does for the Hub and files.
        ranges = [(p.splitname, min(p.from_, len(splits[p.splitname])),
                   min(p.to, len(splits[p.splitname]))) for p in parts]  # fmt: skip
        if not any(hi > lo for _, lo, hi in ranges):
            raise DataError(f"--split {split!r} selects no row of {data}")
        pieces = [splits[name].select(range(lo, hi)) for name, lo, hi in ranges]
        ds = pieces[0] if len(pieces) == 1 else datasets.concatenate_datasets(pieces)
    meta = {
        "name": path.name,
        "kind": "saved_dataset",
        "fingerprint": ds._fingerprint,
        "split": split,
    }
    return Source(ds.to_iterable_dataset() if streaming else ds, RowIds(), meta)


def _split_names(split: str) -> list[str]:
    """The split names of a split expression: ``train[:10%]+test`` names train and test."""
    return [part.split("[")[0].strip() for part in split.split("+")]


def _load_hub(data: str, split: str, subset: str | None, revision: str | None,
              streaming: bool, opts: dict[str, Any]) -> Source:  # fmt: skip
    num_proc = opts.pop("num_proc", None)
    builder = _builder(data, data, subset, revision=revision, **opts)
    _split_files(builder, data, split)
    try:
        ds = _prepare(builder, data, split, streaming, num_proc)
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - as for local files
        raise _read_error(data, builder.name, [], exc) from None
    # A stream has no fingerprint of its own; its name, subset, revision and split are it.
    key = json.dumps([data, subset, revision, split])
    meta = {
        "name": data,
        "kind": "hub",
        "fingerprint": getattr(ds, "_fingerprint", None)
        or hashlib.sha256(key.encode()).hexdigest(),
        "split": split,
        **({"subset": subset} if subset is not None else {}),
        **({"revision": revision} if revision is not None else {}),
    }
    return Source(ds, RowIds(), meta)


def _looks_local(data: str) -> bool:
    """Whether ``data`` can only be a local path: a Hub id is ``NAME`` or ``OWNER/NAME``,
    without a data file's suffix."""
    return (
        data.startswith(("/", ".", "~", "\\"))
        or data.count("/") > 1
        or "\\" in data
        or _suffixes(Path(data))[0] in FORMATS
    )


def load_rows(
    data: str,
    *,
    split: str = "train",
    subset: str | None = None,
    revision: str | None = None,
    streaming: bool = False,
    limit: int | None = None,
    cache_dir: str | None = None,
    num_proc: int | None = None,
) -> Source:
    """Load a data source through ``datasets``, rows in a stable order.

    Args:
        data: a local file or folder, a ``save_to_disk`` folder, or a Hub dataset id.
        split: split of a folder, saved ``DatasetDict`` or Hub dataset (a single file is one
            split, ``train``), or part of one (``train[:10%]``).
        subset: config name of a folder (its ``README.md`` ``configs``) or Hub dataset.
        revision: branch, tag or commit of a Hub dataset.
        streaming: read rows as they are downloaded instead of preparing the dataset first.
        limit: keep only the first ``limit`` rows.
        cache_dir: ``datasets``' cache folder. [default: its own, ``HF_DATASETS_CACHE``]
        num_proc: processes preparing the data.

    Raises:
        DataError: no rows, no usable files, a missing split, or malformed rows.
        ConfigError: an option that does not apply to this kind of source, or an unknown subset.
    """
    path = Path(data)
    opts: dict[str, Any] = {"cache_dir": cache_dir, "num_proc": num_proc}
    if streaming and "[" in split:
        raise ConfigError(
            f"--split {split!r}: a part of a split cannot be streamed; stream the split with "
            "--limit N for its first N rows"
        )
    if path.exists() and revision is not None:
        raise ConfigError(f"--data-revision applies to Hub datasets, not the local {data}")
    if _is_saved_dataset(path):
        if subset is not None:
            raise ConfigError(f"--subset names a config of a folder or Hub dataset, not {data}")
        source = _load_saved(path, data, split, streaming)
    elif path.exists():
        source = _load_files(path, data, split, subset, streaming, opts)
    elif _looks_local(data):  # not worth asking the Hub (which retries for many seconds)
        raise DataError(
            f"{data} does not exist; expected a local file or folder, a save_to_disk folder, "
            "or a Hub dataset id (NAME or OWNER/NAME)"
        )
    else:
        source = _load_hub(data, split, subset, revision, streaming, opts)
    if limit is not None:
        if limit < 0:
            raise ConfigError(f"limit must be >= 0, found {limit}")
        ds = source.dataset
        source.dataset = ds.take(limit) if streaming else ds.select(range(min(limit, len(ds))))
    if not streaming and len(source.dataset) == 0:
        raise DataError(f"{data}: the data source is empty (expected at least one row)")
    return source
