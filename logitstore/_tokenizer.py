"""The store's fingerprint of the teacher's tokenizer, and the check of a student's against it.

The teacher pass writes :func:`tokenizer_fingerprint` into the manifest's ``tokenizer``
section; training (the command line and :class:`logitstore.hf.KDTrainer` alike) compares a
student's tokenizer with it field by field through :func:`check_tokenizer`: two vocabularies
of one size are not one tokenizer.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from logitstore.errors import TokenizerMismatchError


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def tokenizer_fingerprint(tokenizer: Any, vocab_size: int) -> dict[str, Any]:
    """The store's ``tokenizer`` section: what a student's tokenizer must match.

    Args:
        tokenizer: a ``transformers`` tokenizer.
        vocab_size: the teacher's output dimension (may exceed ``len(tokenizer)``: padded
            embedding matrices).

    Returns:
        ``vocab_sha256`` (vocabulary and merges), ``vocab_size``, ``num_tokens``
        (``len(tokenizer)``), ``special_tokens`` (name to ``[token, id]``) and
        ``chat_template_sha256`` (``None`` without a template).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        model = json.loads(backend.to_str()).get("model", {})
        model = {k: model.get(k) for k in ("type", "vocab", "merges")}
    else:
        model = {"vocab": tokenizer.get_vocab()}
    added = {str(k): str(v) for k, v in sorted(tokenizer.get_added_vocab().items())}
    canonical = json.dumps({"model": model, "added": added}, sort_keys=True, ensure_ascii=True)
    special = {}
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        token = getattr(tokenizer, name, None)
        if token is not None:
            special[name] = [str(token), int(tokenizer.convert_tokens_to_ids(str(token)))]
    template = getattr(tokenizer, "chat_template", None)
    return {
        "vocab_sha256": _sha(canonical),
        "vocab_size": int(vocab_size),
        "num_tokens": len(tokenizer),
        "special_tokens": special,
        "chat_template_sha256": _sha(template) if isinstance(template, str) else None,
    }


IDS = ("vocab_sha256", "vocab_size", "num_tokens")
"""The fingerprint's fields that say which text each id is: a student must match them all."""


def check_tokenizer(manifest: Mapping[str, Any], tokenizer: Any) -> list[str]:
    """Refuse a student tokenizer whose ids mean other text than the teacher's, by the store's
    fingerprint; other differences (special tokens, chat template) are notes.

    Args:
        manifest: the store's manifest (``vocab_size`` and ``tokenizer``).
        tokenizer: the student's ``transformers`` tokenizer.

    Returns:
        Notes: fields of the store's fingerprint this version cannot compute, and fields outside
        :data:`IDS` that differ.

    Raises:
        TokenizerMismatchError: a field of :data:`IDS` differs; names it, with both values.
    """
    expected = dict(manifest.get("tokenizer") or {})
    found = tokenizer_fingerprint(tokenizer, int(manifest["vocab_size"]))
    notes = []
    for key, value in expected.items():
        if key not in found:
            notes.append(f"tokenizer field {key!r} not checked")
        elif _canonical(found[key]) == _canonical(value):
            continue
        elif key in IDS:
            raise TokenizerMismatchError(
                f"tokenizer {key} differs: teacher (store) has {_shown(value)}, student has "
                f"{_shown(found[key])}"
            )
        else:  # a pad token set, a chat template given: no id means another token
            notes.append(
                f"tokenizer {key} differs from the teacher's ({_shown(value)} in the store, "
                f"{_shown(found[key])} here): the stored ids train as they are"
            )
    return notes


def _shown(value: Any, limit: int = 200) -> str:
    """``repr`` (control characters escaped), cut to ``limit`` characters: the store's side
    comes from a file that may be anyone's."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)
