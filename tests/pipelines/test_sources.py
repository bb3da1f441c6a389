"""Data sources read through ``datasets``: every format, Hub-layout folders, splits, subsets.

Texts are real (Python's own topic documentation). Each format is checked against the JSON
lines file of the same rows, and split and subset selection against files read back with
pyarrow, not with ``datasets``. No test touches the network: the Hub code path is run on a
local folder.
"""

from __future__ import annotations

import csv
import gzip
import json
import re
from pydoc_data.topics import topics

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from logitstore.errors import ConfigError, DataError
from logitstore.pipelines._data import build_windows
from logitstore.pipelines._sources import _load_hub, load_rows

TEXTS = [topics[k][:600] for k in sorted(topics)[:6]]
README = """---
configs:
{configs}
---
# A dataset card with configs, as the Hub writes it
"""


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """A cache of this test's own: ``datasets`` keys its cache by folder name."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def _formats(root):
    """The same rows (``TEXTS``, field ``text``, plus a number) in every format we read."""
    root.mkdir()
    rows = [{"text": t, "n": i} for i, t in enumerate(TEXTS)]
    lines = "".join(json.dumps(r) + "\n" for r in rows)
    made = {"jsonl": root / "docs.jsonl", "json": root / "docs.json", "gz": root / "docs.jsonl.gz",
            "csv": root / "docs.csv", "parquet": root / "docs.parquet", "txt": root / "txt",
            "saved": root / "saved", "tsv": root / "docs.tsv"}  # fmt: skip
    made["jsonl"].write_text(lines)
    made["json"].write_text(json.dumps(rows))  # one JSON array, not JSON lines
    made["gz"].write_bytes(gzip.compress(lines.encode()))
    for key, sep in (("csv", ","), ("tsv", "\t")):
        with made[key].open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["text", "n"], delimiter=sep)
            writer.writeheader()
            writer.writerows(rows)
    pq.write_table(pa.Table.from_pylist(rows), made["parquet"])
    made["txt"].mkdir()
    for i, text in enumerate(TEXTS):  # one document per file, named in sorted order
        (made["txt"] / f"doc{i}.txt").write_text(text)
    import datasets

    datasets.Dataset.from_list(rows).save_to_disk(made["saved"])
    return made


def test_every_format_gives_the_documents_of_the_jsonl(tmp_path, tiny_tokenizer):
    made = _formats(tmp_path / "data")
    expected = build_windows(load_rows(str(made["jsonl"])), tiny_tokenizer, max_length=64)
    assert len(expected) > len(TEXTS)  # several windows per document
    for kind, path in made.items():
        source = load_rows(str(path))
        assert [r["text"] for _, r in source.rows] == TEXTS, kind
        assert str(tmp_path) not in json.dumps(source.metadata), kind  # nothing machine-specific
        windows = build_windows(source, tiny_tokenizer, max_length=64)
        assert len(windows) == len(expected), kind
        for got, want in zip(windows, expected):
            np.testing.assert_array_equal(got.input_ids, want.input_ids)
            np.testing.assert_array_equal(got.loss_mask, want.loss_mask)
            # Same tokens, same content hash; the row part names the row in its own source.
            assert got.doc_id.rsplit("/", 2)[1:] == want.doc_id.rsplit("/", 2)[1:], kind
    ids = {kind: [row for row, _ in load_rows(str(p)).rows] for kind, p in made.items()}
    assert ids["jsonl"] == ids["gz"][:0] + [f"docs.jsonl:{i}" for i in range(1, 7)]
    assert ids["gz"] == [f"docs.jsonl.gz:{i}" for i in range(1, 7)]
    assert ids["parquet"] == [f"docs.parquet:{i}" for i in range(6)]
    assert ids["txt"] == [f"doc{i}.txt" for i in range(6)]
    assert ids["saved"] == [str(i) for i in range(6)]


def test_json_lines_ids_count_blank_lines_as_before(tmp_path):
    path = tmp_path / "gaps.jsonl"
    path.write_text(f"\n{json.dumps({'text': 'a'})}\n\n{json.dumps({'text': 'b'})}\n\n")
    assert [row for row, _ in load_rows(str(path)).rows] == ["gaps.jsonl:2", "gaps.jsonl:4"]


def _parquet(path, texts):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"text": texts}), path)
    return texts


def _hub_folder(root, readme: bool):
    """A local clone of a Hub dataset: train and test parquet files, with or without a card."""
    train = _parquet(root / "data" / "train-00000-of-00001.parquet", TEXTS[:4])
    test = _parquet(root / "data" / "test-00000-of-00001.parquet", TEXTS[4:])
    if readme:
        (root / "README.md").write_text(
            README.format(
                configs="""- config_name: default
  data_files:
  - split: train
    path: data/train-*
  - split: test
    path: data/test-*"""
            )
        )
    return train, test


@pytest.mark.parametrize("readme", [True, False])
def test_hub_layout_folder_reads_only_the_requested_split(tmp_path, readme):
    folder = tmp_path / "clone"
    _hub_folder(folder, readme)
    for split in ("train", "test"):
        source = load_rows(str(folder), split=split)
        want = pq.read_table(folder / "data" / f"{split}-00000-of-00001.parquet")["text"]
        assert [r["text"] for _, r in source.rows] == want.to_pylist()
        assert source.rows[0][0] == f"data/{split}-00000-of-00001.parquet:0"
        assert source.metadata["split"] == split
    with pytest.raises(DataError, match=r"has splits \['test', 'train'\], not 'validation'"):
        load_rows(str(folder), split="validation")


def test_a_single_file_is_one_split_and_part_of_it_reads_as_asked(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    whole = load_rows(str(path))
    assert [r["text"] for _, r in whole.rows] == TEXTS and whole.metadata["split"] is None
    part = load_rows(str(path), split="train[2:5]")
    assert [r["text"] for _, r in part.rows] == TEXTS[2:5]
    assert part.metadata["split"] == "train[2:5]"  # a run over part of it is told apart
    with pytest.raises(ConfigError, match=r"--split 'test': .* is one file, so one split"):
        load_rows(str(path), split="test")
    with pytest.raises(ConfigError, match="a part of a split cannot be streamed"):
        load_rows(str(path), split="train[:3]", streaming=True)


def _two_configs(root):
    en = _parquet(root / "en" / "train.parquet", TEXTS[:2])
    fr = _parquet(root / "fr" / "train.parquet", TEXTS[2:5])
    (root / "README.md").write_text(
        README.format(
            configs="""- config_name: en
  data_files: en/*.parquet
  default: true
- config_name: fr
  data_files: fr/*.parquet"""
        )
    )
    return en, fr


def test_subset_selects_a_config_of_a_folder(tmp_path):
    en, fr = _two_configs(tmp_path / "multi")
    assert [r["text"] for _, r in load_rows(str(tmp_path / "multi")).rows] == en
    source = load_rows(str(tmp_path / "multi"), subset="fr")
    assert [r["text"] for _, r in source.rows] == fr
    assert source.metadata["subset"] == "fr" and source.rows[0][0] == "fr/train.parquet:0"
    with pytest.raises(ConfigError, match="no subset 'de'"):
        load_rows(str(tmp_path / "multi"), subset="de")


def test_hub_code_path_passes_subset_split_and_streaming(tmp_path, tiny_tokenizer):
    _, fr = _two_configs(tmp_path / "multi")
    name = str(tmp_path / "multi")
    prepared = _load_hub(name, "train", "fr", None, False, {})
    streamed = _load_hub(name, "train", "fr", None, True, {})
    assert [r["text"] for _, r in prepared.rows] == [r["text"] for _, r in streamed.rows] == fr
    assert prepared.metadata["subset"] == "fr" and prepared.metadata["kind"] == "hub"
    assert [row for row, _ in prepared.rows] == ["0", "1", "2"]  # Hub rows: index in the split
    with pytest.raises(DataError, match="not 'test'"):
        _load_hub(name, "test", "fr", None, False, {})
    a, b = (build_windows(s, tiny_tokenizer, max_length=48) for s in (prepared, streamed))
    assert [w.doc_id for w in a] == [w.doc_id for w in b]


def test_streaming_a_local_folder_gives_the_same_windows(tmp_path, tiny_tokenizer):
    _hub_folder(tmp_path / "clone", readme=True)
    prepared = load_rows(str(tmp_path / "clone"), split="test", limit=1)
    streamed = load_rows(str(tmp_path / "clone"), split="test", streaming=True, limit=1)
    a, b = (build_windows(s, tiny_tokenizer, max_length=48) for s in (prepared, streamed))
    assert len(a) > 1 and [w.doc_id for w in a] == [w.doc_id for w in b]
    assert {w.doc_id.rsplit("/", 2)[0] for w in a} == {"data/test-00000-of-00001.parquet:0"}


def test_unusable_sources_are_refused_clearly(tmp_path, tiny_tokenizer):
    notes = tmp_path / "notes.xml"
    notes.write_text("<a>text</a>")
    with pytest.raises(DataError, match="found none usable.*notes.xml"):
        load_rows(str(notes))
    docs = tmp_path / "docs.jsonl"
    docs.write_text(json.dumps({"body": "no text field here"}) + "\n")
    with pytest.raises(DataError, match=r"no field 'text'; found \['body'\]"):
        build_windows(load_rows(str(docs)), tiny_tokenizer, max_length=16)
    with pytest.raises(DataError, match="no field 'messages'"):
        build_windows(
            load_rows(str(docs)), tiny_tokenizer, max_length=16, messages_field="messages"
        )
    with pytest.raises(ConfigError, match="--subset"):
        load_rows(str(docs), subset="en")
    with pytest.raises(ConfigError, match="--data-revision applies to Hub datasets"):
        load_rows(str(docs), revision="main")
    import datasets

    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": TEXTS})}).save_to_disk(saved)
    with pytest.raises(DataError, match=r"has splits \['train'\], not 'test'"):
        load_rows(str(saved), split="test")


def test_a_part_of_a_saved_split_reads_only_that_part(tmp_path):
    """``--split train[:N]`` of a ``save_to_disk`` folder reads N rows, not the whole split."""
    import datasets

    train, test = TEXTS[:4], TEXTS[4:]
    saved = tmp_path / "saved_dict"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict({"text": train}),
         "test": datasets.Dataset.from_dict({"text": test})}
    ).save_to_disk(saved)  # fmt: skip
    one = tmp_path / "saved_one"
    datasets.Dataset.from_dict({"text": TEXTS}).save_to_disk(one)
    cases = [
        (saved, "test", test),
        (saved, "train[:50%]", train[:2]),
        (saved, "train[1:3]+test[-1:]", train[1:3] + test[-1:]),
        (one, "train", TEXTS),
        (one, "train[:3]", TEXTS[:3]),
    ]
    for path, split, expected in cases:
        source = load_rows(str(path), split=split)
        assert [r["text"] for r in source.dataset] == expected, split
        assert source.metadata["split"] == split
    # a part is its own source: its fingerprint differs from the whole split's
    assert (
        load_rows(str(one), split="train[:3]").metadata["fingerprint"]
        != load_rows(str(one)).metadata["fingerprint"]
    )
    with pytest.raises(
        DataError, match=r"has splits \['train'\] \(one saved Dataset is one split\)"
    ):
        load_rows(str(one), split="test")
    with pytest.raises(ConfigError, match=r"--split 'train\[::2\]'"):
        load_rows(str(one), split="train[::2]")
    # a bound past the end reads to the end; a part holding no row is refused
    assert [r["text"] for r in load_rows(str(one), split="train[2:99]").dataset] == TEXTS[2:]
    with pytest.raises(DataError, match=r"--split 'train\[50:\]' selects no row"):
        load_rows(str(one), split="train[50:]")  # 6 rows


def test_a_saved_split_whose_name_is_no_split_expression_is_read_whole(tmp_path):
    import datasets

    saved = tmp_path / "saved"
    datasets.DatasetDict({"train-clean-100": datasets.Dataset.from_dict({"text": TEXTS[:3]})}
                         ).save_to_disk(saved)  # fmt: skip
    source = load_rows(str(saved), split="train-clean-100")
    assert [r["text"] for r in source.dataset] == TEXTS[:3]


@pytest.mark.parametrize(
    ("name", "write"),
    [
        ("docs.jsonl", lambda rows: b"".join(json.dumps({"text": r}, ensure_ascii=False).encode() + b"\n" for r in rows)),
        ("docs.jsonl.gz", lambda rows: gzip.compress(b"".join(json.dumps({"text": r}, ensure_ascii=False).encode() + b"\n" for r in rows))),
        ("docs.csv", lambda rows: b"text\n" + b"".join(b'"' + r.encode() + b'"\n' for r in rows)),
        ("doc.txt", lambda rows: "\n".join(rows).encode() + b"\n"),
    ],
)  # fmt: skip
def test_a_line_that_is_not_utf8_is_named(tmp_path, name, write):
    """A Latin-1 byte in one line is a one-line error naming the file and that line."""
    rows = ["plain ascii text", "more text", "the bad line comes next", "caf\u00e9 au lait"]
    body = write(rows)
    raw = gzip.decompress(body) if name.endswith(".gz") else body
    latin = raw.replace("caf\u00e9".encode(), "caf\u00e9".encode("latin-1"))
    # the line the bad byte is on, counted independently of the reader
    line = raw[: raw.index("caf\u00e9".encode())].count(b"\n") + 1
    path = tmp_path / name
    path.write_bytes(gzip.compress(latin) if name.endswith(".gz") else latin)
    with pytest.raises(DataError, match=rf"{name}:{line} is not UTF-8 text \(byte 0xe9"):
        load_rows(str(path))


@pytest.mark.parametrize(
    "data", ["missing/docs.jsonl", "docs.parquet", "./corpus", "/no/such/folder", "a/b/c"]
)
def test_a_missing_local_path_is_not_looked_up_on_the_hub(data, tmp_path, monkeypatch):
    """A path that cannot be a Hub id (a suffix, ./, /, two slashes) is refused at once; asking
    the Hub first took 20 s of retries offline and then said it could not reach the Hub."""
    import logitstore.pipelines._sources as sources

    asked: list[str] = []

    def hub(data, *args, **kwargs):
        asked.append(data)
        raise DataError("asked the Hub")

    monkeypatch.setattr(sources, "_load_hub", hub)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=rf"{re.escape(data)} does not exist; expected a local"):
        load_rows(data)
    assert asked == []
    with pytest.raises(DataError, match="asked the Hub"):
        load_rows("owner/name")  # a Hub id is still asked for
    assert asked == ["owner/name"]


def test_unknown_hub_id_offline_is_a_data_error(monkeypatch):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="no-such-org/no-such-dataset"):
        load_rows("no-such-org/no-such-dataset")


@pytest.mark.parametrize("suffix", ["jsonl", "parquet"])
def test_chat_rows_read_as_text_name_the_messages_field_to_give(tmp_path, tiny_tokenizer, suffix):
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    rows = [{"id": "a", "conversation": chat}]
    path = tmp_path / f"chats.{suffix}"
    if suffix == "jsonl":
        path.write_text(json.dumps(rows[0]) + "\n")
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(DataError) as info:
        build_windows(load_rows(str(path)), tiny_tokenizer, max_length=16)
    assert str(info.value).endswith(
        "no field 'text'; found ['conversation', 'id']; for chat messages give "
        "--messages-field conversation"
    )
    # A plain field named wrong is answered with the option that names it.
    with pytest.raises(DataError, match=r"found \['conversation', 'id'\]; give the field with "
                       "--messages-field$"):  # fmt: skip
        build_windows(load_rows(str(path)), tiny_tokenizer, max_length=16, messages_field="chat")
