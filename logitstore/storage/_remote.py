"""Remote reads that tell a missing object from a failing network.

``fs.cat(..., on_error="return")`` gives each path its bytes or an exception. A missing object
(``FileNotFoundError``) is final and reported as missing; a transient failure (a timeout, a
reset or refused connection, an HTTP 5xx, 408 or 429, however the fsspec implementation
wraps it) is retried after a growing delay, a bounded number of times, and then raised as
:class:`~logitstore.errors.StoreReadError` naming the URL; any other error (access denied,
a malformed request) is raised at once. fsspec implementations retry some errors themselves
(s3fs, botocore); this layer covers every filesystem the same way.
"""

from __future__ import annotations

import asyncio
import errno
import re
import time
from collections.abc import Iterable, Mapping
from typing import Any

from logitstore.errors import LogitstoreError, StoreReadError

RETRY_DELAYS: tuple[float, ...] = (0.25, 1.0, 4.0)
"""Seconds waited before each retry of a transiently failing read (three retries)."""

_TRANSIENT_ERRNOS = frozenset({
    errno.ECONNRESET, errno.ECONNABORTED, errno.ECONNREFUSED, errno.ETIMEDOUT, errno.EPIPE,
    errno.EAGAIN, errno.EBUSY, errno.EREMOTEIO, errno.EHOSTUNREACH, errno.ENETUNREACH,
    errno.ENETDOWN, errno.ENETRESET,
})  # fmt: skip
# Exception classes of optional HTTP stacks (aiohttp, botocore, urllib3, requests, httpx,
# http.client), named rather than imported so that none of them is required.
_TRANSIENT_NAMES = frozenset({
    "ClientPayloadError", "ServerDisconnectedError", "ClientConnectionError", "ClientOSError",
    "ServerTimeoutError", "IncompleteRead", "ReadTimeoutError", "ConnectTimeoutError",
    "EndpointConnectionError", "ConnectionClosedError", "ResponseParserError", "ProtocolError",
    "RemoteDisconnected", "ReadTimeout", "ConnectTimeout", "RemoteProtocolError",
    "ChunkedEncodingError",
})  # fmt: skip

Result = bytes | FileNotFoundError


def _http_status(exc: BaseException) -> int | None:
    for value in (
        getattr(exc, "status", None),  # aiohttp
        getattr(getattr(exc, "response", None), "status_code", None),  # requests, httpx
        getattr(exc, "code", None),  # urllib
    ):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    response = getattr(exc, "response", None)  # botocore's ClientError holds a dict
    if isinstance(response, dict):
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if isinstance(status, int):
            return status
    return None


def is_missing(exc: BaseException) -> bool:
    """A path that names nothing (or a folder where a file should be)."""
    return isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError))


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it was raised from) may pass if the read is retried."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (TimeoutError, ConnectionError, asyncio.TimeoutError)):
            return True
        if isinstance(current, OSError) and current.errno in _TRANSIENT_ERRNOS:
            return True
        status = _http_status(current)
        if status is not None and (status >= 500 or status in (408, 429)):
            return True
        if type(current).__name__ in _TRANSIENT_NAMES:
            return True
        current = current.__cause__ or current.__context__
    return False


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """``text`` with control characters escaped as Python writes them (``\\x1b``)."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


def describe(exc: BaseException) -> str:
    """``Type: first line of the message``, short, control characters escaped: a library's
    message may quote a store's bytes (an escape sequence would reach the terminal)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = text[:200] + ("..." if len(text) > 200 else "")
    text = printable(text)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def cat(
    fs: Any, paths: Iterable[str], limits: Mapping[str, int] | None = None
) -> dict[str, Result]:
    """Each path's bytes, or ``FileNotFoundError`` for a missing one; transient failures
    retried after :data:`RETRY_DELAYS`.

    Args:
        limits: the most bytes fetched of each path (a ranged read from byte 0): an object
            larger than its manifest says shows as longer than expected, without being
            downloaded whole.

    Raises:
        StoreReadError: a path kept failing (or failed in a way retrying cannot help); the
            message names its URL and the last error.
    """
    pending = list(dict.fromkeys(paths))
    out: dict[str, Result] = {}
    for attempt in range(len(RETRY_DELAYS) + 1):
        if attempt:
            time.sleep(RETRY_DELAYS[attempt - 1])
        try:
            if not pending:
                got = {}
            elif limits is None:
                got = fs.cat(pending, on_error="return")
            else:
                ends = [limits[path] for path in pending]
                if _is_http(fs):
                    ranged = _http_heads(fs, pending, ends)
                else:
                    ranged = fs.cat_ranges(pending, [0] * len(pending), ends, on_error="return")
                got = dict(zip(pending, ranged, strict=True))
        except LogitstoreError:
            raise
        except Exception as exc:  # the whole call failed: every path failed alike
            got = dict.fromkeys(pending, exc)
        failed: dict[str, BaseException] = {}
        for path in pending:
            value = got.get(path, FileNotFoundError(path))
            if isinstance(value, BaseException):
                if is_missing(value):
                    out[path] = FileNotFoundError(path)
                elif is_transient(value):
                    failed[path] = value
                else:
                    raise _read_error(fs, path, value, attempt + 1) from None
            else:
                out[path] = bytes(value)
        if not failed:
            return out
        pending = list(failed)
    path, last = next(iter(failed.items()))
    raise _read_error(fs, path, last, len(RETRY_DELAYS) + 1) from None


def _is_http(fs: Any) -> bool:
    try:
        from fsspec.implementations.http import HTTPFileSystem
    except ImportError:  # (aiohttp is not installed: no http:// store can be open)
        return False
    return isinstance(fs, HTTPFileSystem)


def _http_heads(fs: Any, paths: list[str], ends: list[int]) -> list[bytes | BaseException]:
    """The first ``end`` bytes of each URL, fetched together and never more.

    fsspec's HTTP ``cat_ranges`` asks for the range but reads the whole response: a server
    that ignores ``Range`` (many simple ones do), or one that sends a small gzip body of
    gigabytes (``Content-Encoding`` is decoded on the way), made a reader hold all of it. Here
    the response is read as it streams (and decoded as it is read) up to ``end`` bytes, then
    dropped.
    """
    import fsspec.asyn

    async def head(path: str, end: int) -> bytes | BaseException:
        kwargs = dict(fs.kwargs)
        headers = {**kwargs.pop("headers", {}), "Range": f"bytes=0-{max(end - 1, 0)}"}
        try:
            session = await fs.set_session()
            url = fs.encode_url(path) if hasattr(fs, "encode_url") else path
            async with session.get(url, headers=headers, **kwargs) as response:
                fs._raise_not_found_for_status(response, path)
                out = bytearray()
                while len(out) < end:
                    chunk = await response.content.read(min(end - len(out), 1 << 20))
                    if not chunk:
                        break
                    out += chunk
                if not response.content.at_eof():
                    response.close()  # what is left of a longer body is dropped, never read
                return bytes(out)
        except Exception as exc:  # one path's failure, as cat_ranges(on_error="return")
            return exc

    async def heads() -> list[bytes | BaseException]:
        return list(await asyncio.gather(*(head(p, e) for p, e in zip(paths, ends, strict=True))))

    return list(fsspec.asyn.sync(fs.loop, heads))


def _read_error(fs: Any, path: str, exc: BaseException, attempts: int) -> StoreReadError:
    try:
        url = fs.unstrip_protocol(path)
    except Exception:  # a filesystem without it: the bare path still names the object
        url = path
    tries = f" after {attempts} attempts" if attempts > 1 else ""
    return StoreReadError(f"cannot read {url}{tries}: {describe(exc)}")
