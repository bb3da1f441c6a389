"""Every error logitstore raises on purpose.

Each class also subclasses the matching built-in, so callers can catch either. Messages say
what was expected and what was found. The CLI catches :class:`LogitstoreError` once, in the
group, and turns it into a message and a non-zero exit.
"""

from __future__ import annotations

import re


def shown(value: object, limit: int = 60) -> str:
    """``repr(value)`` as a message quotes a value read from a store: control characters
    escaped, cut to ``limit`` characters (a stranger's value may be a megabyte long; a message
    stays one line a person reads)."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in repr(value)[: limit + 1])
    return text if len(text) <= limit else text[: limit - 3] + "..."


class LogitstoreError(Exception):
    """Base class of every error raised on purpose by logitstore.

    Raised in a DataLoader worker process, an error reaches the main process rebuilt by
    PyTorch from one string: "Caught X in DataLoader worker process N", then the worker's whole
    traceback. Such a string is cut back to the error's own message, with where it was raised.
    """

    def __init__(self, *args: object) -> None:
        if len(args) == 1 and isinstance(args[0], str):
            args = (_from_worker(args[0], type(self)),)
        super().__init__(*args)


_WORKER = re.compile(
    r"Caught (\w+) (in [^\n]*?)\.\nOriginal Traceback \(most recent call last\):\n"
)


def _from_worker(message: str, cls: type) -> str:
    """``message`` as the worker raised it, when it is PyTorch's report of a worker's error."""
    head = _WORKER.match(message)
    if head is None or head.group(1) != cls.__name__:
        return message
    name = f"{cls.__module__}.{cls.__qualname__}: "
    at = message.rfind("\n" + name)  # the traceback's last line: the error, as raised
    if at < 0:
        return message
    return f"{message[at + 1 + len(name) :].strip()} ({head.group(2)})"


class UnknownNameError(LogitstoreError, KeyError):
    """A name (codec, backend, divergence, parameter) is not registered."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class ConfigError(LogitstoreError, ValueError):
    """A parameter value or combination of settings is invalid."""


class StoreNotFoundError(LogitstoreError, FileNotFoundError):
    """No store (or a file the manifest names) at the given location."""


class StoreExistsError(LogitstoreError, FileExistsError):
    """The output location already holds a store, or a different one."""


class OutputNotWritableError(LogitstoreError, OSError):
    """An output location (a store, a run directory) cannot be written: permissions, a file
    in the way, a read-only or full disk."""


class ManifestError(LogitstoreError, ValueError):
    """The manifest is missing, not valid JSON, or lacks required fields."""


class FormatVersionError(ManifestError):
    """The store was written with a format or codec version this reader does not know."""


class UnsafePathError(LogitstoreError, ValueError):
    """A path named by a manifest escapes the store's root."""


class CorruptShardError(LogitstoreError, ValueError):
    """A shard's checksum, size or shapes disagree with the manifest, or it is missing."""


class SettingsMismatchError(LogitstoreError, ValueError):
    """A resumed run's settings differ from those the store was created with."""


class TokenizerMismatchError(LogitstoreError, ValueError):
    """The student's tokenizer or vocabulary differs from the teacher's."""


class NonFiniteTeacherError(LogitstoreError, FloatingPointError):
    """Teacher logits contain NaN or Inf."""


class TemperatureNotCapturedError(LogitstoreError, ValueError):
    """Training asked for a temperature the cache did not capture."""


class ShardClaimError(LogitstoreError, FileExistsError):
    """Two writers claim the same shard."""


class DataError(LogitstoreError, ValueError):
    """Input data is empty, malformed, or does not fit the settings."""


class HubAuthError(LogitstoreError, PermissionError):
    """No Hugging Face Hub token was found where one is needed (e.g. to push a store)."""


class StoreReadError(LogitstoreError, OSError):
    """A store's file exists but could not be read: a network error (timeout, reset
    connection, server error) that persisted after bounded retries, or a local I/O error.
    The message names the URL; a missing file is reported as missing, never as this."""


class BadValueError(CorruptShardError):
    """A shard's decoded values break the format's rules: an id outside the vocabulary, NaN,
    a log-probability above 0, or support and tail mass above 1.

    Attributes:
        row: the first bad position, counted over the decoded arrays (-1 when unknown).
        field: the decoded field it was found in (e.g. ``support_ids``).
    """

    def __init__(self, message: str, row: int = -1, field: str = "") -> None:
        super().__init__(message)
        self.row, self.field = row, field
