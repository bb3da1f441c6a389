"""The store's tokenizer fingerprint and the check of a student's tokenizer against it."""

from __future__ import annotations

import pytest

from logitstore._tokenizer import check_tokenizer, tokenizer_fingerprint
from logitstore.errors import TokenizerMismatchError


def test_the_same_tokenizer_passes_and_an_unknown_field_is_a_note(tiny_tokenizer):
    section = {**tokenizer_fingerprint(tiny_tokenizer, 384), "added_in_a_later_version": 1}
    manifest = {"vocab_size": 384, "tokenizer": section}
    assert check_tokenizer(manifest, tiny_tokenizer) == [
        "tokenizer field 'added_in_a_later_version' not checked"
    ]


def test_a_hostile_stores_value_is_escaped_and_cut_in_the_message(tiny_tokenizer):
    # The manifest is anyone's file: its side of the message must neither flood a terminal nor
    # drive it (an escape sequence), however long or odd the value.
    hostile = "\x1b[2J\x1b[31m" + "A" * 100_000
    section = {**tokenizer_fingerprint(tiny_tokenizer, 384), "vocab_sha256": hostile}
    with pytest.raises(TokenizerMismatchError) as caught:
        check_tokenizer({"vocab_size": 384, "tokenizer": section}, tiny_tokenizer)
    message = str(caught.value)
    assert "vocab_sha256 differs" in message and "\x1b" not in message
    assert "\\x1b[2J" in message and len(message) < 600
    assert f"({len(repr(hostile))} characters)" in message


def test_a_pad_token_or_chat_template_of_the_students_own_is_a_note(tiny_tokenizer, tmp_path):
    # Setting a pad token or a chat template changes no id: the stored ids train as they are.
    from transformers import AutoTokenizer

    manifest = {"vocab_size": 384, "tokenizer": tokenizer_fingerprint(tiny_tokenizer, 384)}
    tiny_tokenizer.save_pretrained(tmp_path)
    student = AutoTokenizer.from_pretrained(tmp_path)
    student.pad_token = "<|im_end|>"
    student.chat_template = "{{ messages }}"
    assert student.convert_tokens_to_ids("<|im_end|>") == tiny_tokenizer.convert_tokens_to_ids(
        "<|im_end|>"
    )
    notes = check_tokenizer(manifest, student)
    assert [n.split(" differs")[0] for n in notes] == [
        "tokenizer special_tokens", "tokenizer chat_template_sha256"
    ]  # fmt: skip
    assert "'<|im_end|>'" in notes[0]
    student.add_tokens(["<extra>"])  # a new id: no longer the teacher's ids
    with pytest.raises(TokenizerMismatchError, match="differs"):
        check_tokenizer(manifest, student)
