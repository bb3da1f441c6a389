"""Fixtures of the pipeline tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def tokenizer_calls(monkeypatch) -> list[str]:
    """Every text ``build_windows`` tokenizes during the test (a cache hit tokenizes none)."""
    import logitstore.pipelines._data as data

    calls: list[str] = []
    real = data.tokenize_text
    monkeypatch.setattr(
        data, "tokenize_text", lambda tok, text: calls.append(text) or real(tok, text)
    )
    return calls
