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
    section = {**tokenizer_fingerprint(tiny_tokenizer, 384), "chat_template_sha256": hostile}
    with pytest.raises(TokenizerMismatchError) as caught:
        check_tokenizer({"vocab_size": 384, "tokenizer": section}, tiny_tokenizer)
    message = str(caught.value)
    assert "chat_template_sha256 differs" in message and "\x1b" not in message
    assert "\\x1b[2J" in message and len(message) < 600
    assert f"({len(repr(hostile))} characters)" in message
