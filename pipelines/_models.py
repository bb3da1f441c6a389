"""Where a model comes from (Hub id, local directory, GGUF file), checked before loading.

``transformers`` answers a mistyped local path with "Repo id must be in the form ..." and a
folder that holds no model with whatever its tokenizer or config reader trips over first; here
both become a :class:`ConfigError` that names the path and what was expected, and any other
failure to load is reported as one, with what ``transformers`` said.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

from logitstore.errors import ConfigError, LogitstoreError

EXPECTED_TEACHER = "a Hub id, a model directory (with config.json) or a .gguf file"
EXPECTED_STUDENT = "a Hub id, a model directory (with config.json) or a model config file"
EXPECTED_TOKENIZER = "a Hub id, a tokenizer directory or a .gguf file"


def looks_local(spec: str) -> bool:
    """Whether ``spec`` can only be a local path: a Hub id is ``name`` or ``owner/name``."""
    return (
        spec.startswith(("/", ".", "~", "\\"))
        or spec.count("/") > 1
        or "\\" in spec
        or Path(spec).suffix.lower() in {".gguf", ".json", ".yaml", ".yml", ".safetensors"}
    )


_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "vocab.json", "tokenizer.model")


def check_model_location(
    spec: str,
    what: str,
    *,
    gguf_file: str | None = None,
    tokenizer: bool = False,
    expected: str = EXPECTED_TEACHER,
) -> None:
    """Refuse a local path that cannot hold a model, before ``transformers`` tries it.

    Args:
        spec: what the user named: Hub id, model directory (or a ``.gguf`` file, for a teacher).
        what: the role, for the message: ``teacher``, ``student``, ``tokenizer``...
        gguf_file: a GGUF file name inside ``spec``.
        tokenizer: ``spec`` names a tokenizer, which needs tokenizer files, not a config.
        expected: what ``spec`` may be, for the message.

    Raises:
        ConfigError: a local path that does not exist, a file that is not a model, a folder
            without ``config.json`` (or without the named GGUF file).
    """
    path = Path(spec).expanduser()
    if not path.exists():
        if looks_local(spec):
            raise ConfigError(f"the {what} {spec} does not exist; expected {expected}")
        return  # a Hub id: transformers downloads it (or says why not)
    if path.is_file():
        raise ConfigError(f"the {what} {spec} is a file, not a model; expected {expected}")
    if gguf_file is not None:
        if not (path / gguf_file).is_file():
            found = sorted(p.name for p in path.glob("*.gguf"))
            raise ConfigError(
                f"the {what} {spec} has no GGUF file {gguf_file!r}; found {found or 'none'}"
            )
        return
    if tokenizer:
        if not any((path / name).is_file() for name in _TOKENIZER_FILES):
            raise ConfigError(
                f"the {what} {spec} is a folder without tokenizer files "
                f"({', '.join(_TOKENIZER_FILES)}); expected {expected}"
            )
        return
    if not (path / "config.json").is_file():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        hint = ""
        if ggufs and what == "teacher":
            hint = f"; to load a GGUF file, name it with --gguf-file (found {ggufs})"
        elif ggufs:
            hint = f"; to load a GGUF file, give its path: {Path(spec) / ggufs[0]}"
        raise ConfigError(
            f"the {what} {spec} is a folder without config.json, not a model directory "
            f"(save_pretrained writes one){hint}"
        )


@contextlib.contextmanager
def loading(what: str, spec: str) -> Iterator[None]:
    """Turn ``transformers``' errors while loading ``spec`` into a one-line ``ConfigError``."""
    try:
        yield
    except LogitstoreError:
        raise
    except (OSError, ValueError, TypeError, KeyError, ImportError, json.JSONDecodeError) as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__
        raise ConfigError(f"cannot load the {what} {spec}: {message}") from exc
