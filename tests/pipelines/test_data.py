"""Data loading, tokenisation, chat masks, windowing and doc ids of the teacher pass."""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from logitstore.errors import DataError
from logitstore.pipelines._data import (
    build_windows,
    doc_id,
    load_rows,
    make_windows,
    tokenize_chat,
    tokenize_text,
)

TEXTS = ["First document.\nIt has two lines.", "Second one.", "Third: unicode é ü 漢字."]


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """A cache of this test's own: ``datasets`` keys its cache by folder name."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    return tmp_path / "hf-cache"


@pytest.mark.parametrize("n", [2, 3, 9, 10, 11, 17, 40])
@pytest.mark.parametrize("max_length", [2, 5, 10])
def test_windows_cover_every_position_exactly_once(n, max_length):
    rng = np.random.default_rng(n * 100 + max_length)
    ids = rng.integers(0, 1000, size=n)
    trained = rng.random(n) < 0.6
    windows = make_windows("row", ids, trained, max_length=max_length)
    seen: list[int] = []
    for j, w in enumerate(windows):
        assert 2 <= w.num_tokens <= max_length
        assert w.doc_id.startswith(f"row/w{j}/")
        start = j * (max_length - 1)  # the documented stride
        np.testing.assert_array_equal(w.input_ids, ids[start : start + w.num_tokens])
        # Window position t predicts the document's token start + t + 1, with its label flag.
        np.testing.assert_array_equal(w.loss_mask, trained[start + 1 : start + w.num_tokens])
        seen.extend(range(start, start + w.num_tokens - 1))
    assert seen == list(range(n - 1))


def test_short_documents_are_skipped_and_long_ones_refused_without_windowing():
    assert make_windows("r", np.array([5]), np.array([True]), max_length=4) == []
    ids = np.arange(6)
    assert len(make_windows("r", ids, np.ones(6, bool), max_length=6, windowing=False)) == 1
    with pytest.raises(DataError, match="'docs.jsonl:7'.*7 tokens"):
        make_windows("docs.jsonl:7", np.arange(7), np.ones(7, bool), max_length=6, windowing=False)


def test_doc_id_is_keyed_by_content():
    ids = np.array([3, 1, 4, 1, 5])
    a = doc_id("f.jsonl:2", 0, ids)
    assert a == doc_id("f.jsonl:2", 0, ids.astype(np.int32))  # dtype does not matter
    assert a != doc_id("f.jsonl:2", 0, ids[::-1])
    assert a != doc_id("f.jsonl:3", 0, ids) and a != doc_id("f.jsonl:2", 1, ids)
    import hashlib

    expected = hashlib.sha256(np.asarray(ids, "<i8").tobytes()).hexdigest()[:16]
    assert a == f"f.jsonl:2/w0/{expected}"


def _write_sources(tmp_path):
    """The same three texts as a .txt directory, .jsonl, .parquet and a saved dataset."""
    txt = tmp_path / "txt"
    txt.mkdir()
    for i, text in enumerate(TEXTS):
        (txt / f"doc{i}.txt").write_text(text, encoding="utf-8")
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text(
        "".join(json.dumps({"text": t, "n": i}) + "\n" for i, t in enumerate(TEXTS)) + "\n"
    )
    parquet = tmp_path / "pq"
    parquet.mkdir()
    pq.write_table(pa.table({"text": TEXTS[:2]}), parquet / "a.parquet")
    pq.write_table(pa.table({"text": TEXTS[2:]}), parquet / "b.parquet")
    import datasets

    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": TEXTS})}).save_to_disk(saved)
    return {"txt": txt, "jsonl": jsonl, "parquet": parquet, "saved": saved}


def test_every_local_source_kind_yields_the_same_rows(tmp_path):
    sources = _write_sources(tmp_path)
    for kind, path in sources.items():
        source = load_rows(str(path))
        assert [r["text"] for _, r in source.rows] == TEXTS, kind
        assert len({row_id for row_id, _ in source.rows}) == len(TEXTS), kind
        assert str(tmp_path) not in json.dumps(source.metadata), kind  # nothing machine-specific
    jsonl = load_rows(str(sources["jsonl"]))
    assert [r for r, _ in jsonl.rows] == ["docs.jsonl:1", "docs.jsonl:2", "docs.jsonl:3"]
    assert len(load_rows(str(sources["parquet"]), limit=2).rows) == 2


def test_relative_paths_read_as_absolute_ones(tmp_path, monkeypatch):
    # datasets names files by absolute path; a path given relative to the working directory
    # (as `make demo` does) must give the same rows, row ids and fingerprint.
    sources = _write_sources(tmp_path)
    monkeypatch.chdir(tmp_path)
    for kind, path in sources.items():
        absolute = load_rows(str(path))
        relative = load_rows(str(path.relative_to(tmp_path)))
        assert relative.rows == absolute.rows, kind
        assert relative.metadata == absolute.metadata, kind


def test_source_fingerprint_follows_the_content(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "a"}) + "\n")
    first = load_rows(str(path)).metadata["fingerprint"]
    assert load_rows(str(path)).metadata["fingerprint"] == first
    path.write_text(json.dumps({"text": "b"}) + "\n")
    assert load_rows(str(path)).metadata["fingerprint"] != first


def test_empty_or_bad_data_is_refused(tmp_path, tiny_tokenizer):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="empty"):
        load_rows(str(empty))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(DataError, match="bad.jsonl:2"):
        load_rows(str(bad))
    source = load_rows(str(_write_sources(tmp_path)["jsonl"]))
    with pytest.raises(DataError, match="no field 'body'"):
        build_windows(source, tiny_tokenizer, max_length=64, text_field="body")


def test_text_tokenisation_round_trips(tiny_tokenizer):
    ids, trained = tokenize_text(tiny_tokenizer, TEXTS[2])
    assert ids.dtype == np.int64 and trained.all()
    assert tiny_tokenizer.decode(ids) == TEXTS[2]


CHAT = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What is a tuple?"},
    {"role": "assistant", "content": "An immutable sequence."},
    {"role": "user", "content": "And a list?"},
    {"role": "assistant", "content": "A mutable one."},
]


def test_chat_mask_covers_assistant_turns_only(tiny_tokenizer):
    ids, trained = tokenize_chat(tiny_tokenizer, CHAT)
    # The whole rendering is tokenized, and the trained tokens are exactly the assistant replies
    # with the template's end-of-turn text: checked by decoding, independently of offsets.
    assert tiny_tokenizer.decode(ids) == tiny_tokenizer.apply_chat_template(CHAT, tokenize=False)
    replies = "".join(m["content"] + "<|im_end|>\n" for m in CHAT if m["role"] == "assistant")
    assert tiny_tokenizer.decode(ids[trained]) == replies
    untrained = tiny_tokenizer.decode(ids[~trained])
    assert "tuple" in untrained and "briefly" in untrained and "immutable" not in untrained
    # The loss mask is the label flags shifted by one (position t predicts token t + 1).
    (window,) = make_windows("c", ids, trained, max_length=len(ids))
    np.testing.assert_array_equal(window.loss_mask, trained[1:])


def test_chat_rows_through_build_windows(tmp_path, tiny_tokenizer):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": CHAT}) + "\n")
    windows = build_windows(
        load_rows(str(path)), tiny_tokenizer, max_length=16, messages_field="messages"
    )
    ids, trained = tokenize_chat(tiny_tokenizer, CHAT)
    assert len(windows) == -(-(len(ids) - 1) // 15)
    mask = np.concatenate([w.loss_mask for w in windows])
    np.testing.assert_array_equal(mask, trained[1:])


def test_windows_are_cached_under_everything_that_changes_the_tokens(
    tmp_path, tiny_tokenizer, tiny_teacher_dir, datasets_cache, tokenizer_calls
):
    from pydoc_data.topics import topics

    from transformers import AutoTokenizer

    texts = [topics[k][:800] for k in sorted(topics)[:4]]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t, "title": t[:20]}) + "\n" for t in texts))
    calls = tokenizer_calls

    def windows(tokenizer=tiny_tokenizer, **kw):
        return build_windows(load_rows(str(path)), tokenizer, **{"max_length": 32, **kw})

    first = windows()
    assert calls == texts  # each row tokenized once, in order
    again = windows()
    assert len(calls) == 4  # read from the cache, not tokenized again
    assert [w.doc_id for w in again] == [w.doc_id for w in first]
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a.input_ids, b.input_ids)
        np.testing.assert_array_equal(a.loss_mask, b.loss_mask)
    other_template = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    other_template.chat_template = "{{ messages }}"
    more_tokens = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    more_tokens.add_tokens(["<|extra|>"])
    for change in ({"max_length": 33}, {"windowing": False, "max_length": 4096},
                   {"text_field": "title"}, {"tokenizer": other_template},
                   {"tokenizer": more_tokens}):  # fmt: skip
        before = len(calls)
        windows(**change)
        assert len(calls) == before + 4, change
    assert len(calls) == 24
    windows(tokenizer=AutoTokenizer.from_pretrained(tiny_teacher_dir))  # same tokenizer, reloaded
    assert len(calls) == 24
    path.write_text(path.read_text().replace("the", "a"))  # new content, same file name
    windows()
    assert len(calls) == 28
    shutil.rmtree(datasets_cache / "logitstore-windows")
    windows()
    assert len(calls) == 32  # the count would not move if nothing were read from the cache


def test_parallel_tokenization_gives_the_same_windows(tmp_path, tiny_tokenizer):
    from pydoc_data.topics import topics

    path = tmp_path / "docs.jsonl"
    path.write_text(
        "".join(json.dumps({"text": topics[k][:500]}) + "\n" for k in sorted(topics)[:8])
    )
    one = build_windows(load_rows(str(path)), tiny_tokenizer, max_length=40)
    two = build_windows(load_rows(str(path), num_proc=2), tiny_tokenizer, max_length=40, num_proc=2)
    assert [w.doc_id for w in one] == [w.doc_id for w in two] and len(one) > 8


def test_windows_from_the_cache_share_it_instead_of_copying_it(tmp_path, tiny_tokenizer):
    """Every torchrun rank reads the same cached windows: their token ids are views of the
    memory-mapped cache file, not a private copy per rank (8 bytes a token)."""
    import tracemalloc
    from pydoc_data.topics import topics

    texts = [topics[k] for k in sorted(topics)]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    build_windows(load_rows(str(path)), tiny_tokenizer, max_length=1024)  # fills the cache
    source = load_rows(str(path))
    tracemalloc.start()  # numpy reports its buffers to tracemalloc
    try:
        windows = build_windows(source, tiny_tokenizer, max_length=1024)
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    ids_bytes = sum(w.input_ids.nbytes for w in windows)
    assert ids_bytes > 2_000_000  # enough tokens for the ids to dominate what the windows hold
    assert held < ids_bytes / 4, (held, ids_bytes)
    first = {w.doc_id.split("/")[0]: w for w in windows if "/w0/" in w.doc_id}
    for row, text in enumerate(texts[:3]):  # and still the right tokens
        expected = tokenize_text(tiny_tokenizer, text)[0][:1024]
        np.testing.assert_array_equal(first[f"docs.jsonl:{row + 1}"].input_ids, expected)


def test_documents_longer_than_the_tokenizer_maximum_raise_no_false_alarm(tiny_teacher_dir, caplog):
    """A document past the tokenizer's model_max_length is windowed, so transformers' "will
    result in indexing errors" warning would be a false alarm; the tokens are all kept."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    tokenizer = AutoTokenizer.from_pretrained(tiny_teacher_dir)  # fresh: it warns once
    tokenizer.model_max_length = 16
    text = " ".join(TEXTS * 8)
    chat = [{"role": "user", "content": text}, {"role": "assistant", "content": text}]
    hf_logging.enable_propagation()
    try:
        with caplog.at_level("WARNING"):
            ids, _ = tokenize_text(tokenizer, text)
            chat_ids, _ = tokenize_chat(tokenizer, chat)
    finally:
        hf_logging.disable_propagation()
    assert not [r for r in caplog.records if "maximum sequence length" in r.getMessage()]
    assert len(ids) == len(tokenizer.backend_tokenizer.encode(text).ids) > 16
    assert len(chat_ids) > 2 * len(ids)


TOOL_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content or '' }}"
    "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function.name }}"
    "{{ c.function.arguments | tojson }}</tool_call>{% endfor %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)  # as Qwen 2.5's: a tool call's arguments, a mapping, rendered as JSON


def test_tool_calls_from_parquet_render_as_they_were_written(tmp_path, tiny_tokenizer):
    """Arrow stores a column of messages as one struct type, so a tool call read from Parquet
    has every argument any call in the column has, None where it had none; the template must
    render the calls as written ({"city": "Paris"}), not {"city": "Paris", "query": null}."""
    import copy

    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = TOOL_TEMPLATE

    def chat(name, arguments, answer):
        call = {"type": "function", "function": {"name": name, "arguments": arguments}}
        return [{"role": "user", "content": "Please look it up."},
                {"role": "assistant", "tool_calls": [call]},
                {"role": "tool", "content": "done"},
                {"role": "assistant", "content": answer}]  # fmt: skip

    chats = [chat("get_weather", {"city": "Paris"}, "It is 22 C."),
             chat("search", {"query": "cats", "limit": 3}, "Found cats.")]  # fmt: skip
    path = tmp_path / "chats.parquet"
    pq.write_table(pa.Table.from_pylist([{"messages": c} for c in chats]), path)
    stored = pq.read_table(path).to_pylist()[0]["messages"][1]["tool_calls"][0]
    assert stored["function"]["arguments"] == {"city": "Paris", "query": None, "limit": None}
    windows = build_windows(
        load_rows(str(path)), tokenizer, max_length=4096, messages_field="messages"
    )
    assert len(windows) == len(chats)
    for w, written in zip(windows, chats):
        ids, trained = tokenize_chat(tokenizer, written)  # the rows as written
        assert tokenizer.decode(w.input_ids) == tokenizer.decode(ids)
        np.testing.assert_array_equal(w.input_ids, ids)
        np.testing.assert_array_equal(w.loss_mask, trained[1:])


# Qwen2.5's and SmolLM2's way: a default system prompt written inside the loop over messages,
# so an empty conversation renders none.
DEFAULT_SYSTEM_TEMPLATE = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ m['role'] }}\n"
    "{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_a_conversation_the_assistant_opens_trains_its_replies_alone(tiny_tokenizer):
    """The template's default system prompt and header before a first reply are not trained."""
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = DEFAULT_SYSTEM_TEMPLATE
    chat = [
        {"role": "assistant", "content": "Hello, what shall we read?"},
        {"role": "user", "content": "A tuple."},
        {"role": "assistant", "content": "An immutable sequence."},
    ]
    ids, trained = tokenize_chat(tokenizer, chat)
    text = tokenizer.apply_chat_template(chat, tokenize=False)
    assert tokenizer.decode(ids) == text and text.startswith("<|im_start|>system\nYou are")
    replies = "".join(m["content"] + "<|im_end|>\n" for m in chat if m["role"] == "assistant")
    assert tokenizer.decode(ids[trained]) == replies


def as_parts(chat: list[dict]) -> list[dict]:
    """``chat`` with each content given as OpenAI's parts: ``[{"type": "text", "text": ...}]``."""
    return [{**m, "content": [{"type": "text", "text": m["content"]}]} for m in chat]


PARTS_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for p in m['content'] %}"
    "{{ p['text'] }}{% endfor %}<|im_end|>\n{% endfor %}"
)


def test_content_given_as_text_parts_renders_as_its_text(tmp_path, tiny_tokenizer):
    """A template of a text model wrote parts as their Python list (``[{'type': 'text', ...``)
    into the teacher's input, or failed on them; they are the conversation's strings."""
    path = tmp_path / "parts.jsonl"
    path.write_text(json.dumps({"messages": as_parts(CHAT)}) + "\n")
    strings = tokenize_chat(tiny_tokenizer, CHAT)
    tokenizer = copy.deepcopy(tiny_tokenizer)
    for template in (
        tiny_tokenizer.chat_template,  # writes {{ content }}: a list's repr
        tiny_tokenizer.chat_template.replace("{{ m['content'] }}", "{{ '' + m['content'] }}"),
    ):  # ... or fails on a list (str + list, as SmolLM2's and Qwen2.5's templates do)
        tokenizer.chat_template = template
        (window,) = build_windows(
            load_rows(str(path)), tokenizer, max_length=512, messages_field="messages"
        )
        np.testing.assert_array_equal(window.input_ids, strings[0])
        np.testing.assert_array_equal(window.loss_mask, strings[1][1:])
    # A template that reads parts renders them itself.
    tokenizer.chat_template = PARTS_TEMPLATE
    ids, _ = tokenize_chat(tokenizer, as_parts(CHAT))
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(as_parts(CHAT), tokenize=False)
    assert "'type'" not in tokenizer.decode(ids)
    # An image part is not text: refused, naming the types.
    image = as_parts(CHAT)
    image[1]["content"].append({"type": "image_url", "image_url": {"url": "x.png"}})
    path.write_text(json.dumps({"messages": image}) + "\n")
    tokenizer.chat_template = tiny_tokenizer.chat_template
    with pytest.raises(
        DataError, match=r"message 1 of 'messages' has parts of types \['image_url', 'text'\]"
    ):
        build_windows(load_rows(str(path)), tokenizer, max_length=512, messages_field="messages")
