"""Progress of long work: a bar on a terminal, a line a minute in a log file.

Under ``nohup`` or a job scheduler stderr is a file, which has no carriage return: a bar would
show nothing until the end, or one line per refresh. There progress is written as whole lines,
one every :data:`LOG_INTERVAL` seconds, and none for work shorter than that.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Iterator
from typing import Any

from tqdm import tqdm

LOG_INTERVAL = 60.0
"""Seconds between progress lines where stderr is a log file, not a terminal."""


class _LogLines:
    """A stream for tqdm that turns each refresh into one line (a log file has no ``\\r``)."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").strip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(
    total: int | None, *, show: bool, unit: str = "doc", desc: str | None = None
) -> tqdm:
    """A tqdm bar on stderr: on a terminal, redrawn in place; elsewhere a line every
    :data:`LOG_INTERVAL` seconds (read at each call, so tests can shorten it)."""
    if sys.stderr.isatty():
        return tqdm(total=total, unit=unit, desc=desc, disable=not show, dynamic_ncols=True)
    return tqdm(total=total, unit=unit, desc=desc, disable=not show, file=_LogLines(sys.stderr),
                mininterval=LOG_INTERVAL, delay=LOG_INTERVAL, ncols=100)  # fmt: skip


def _gguf_module() -> Any:
    """``transformers``' GGUF loader, or None where it does not import."""
    try:
        from transformers import modeling_gguf_pytorch_utils
    except ImportError:
        return None
    return modeling_gguf_pytorch_utils if hasattr(modeling_gguf_pytorch_utils, "tqdm") else None


@contextlib.contextmanager
def library_bars(show: bool) -> Iterator[None]:
    """The progress bars of ``datasets``, ``transformers`` (loading and saving weights,
    dequantising a GGUF file) and ``huggingface_hub`` only where ``show``: ``--no-progress``
    leaves stderr free of them, as it is of ours."""
    import datasets
    import huggingface_hub.utils as hub
    from transformers.utils import logging as hf_logging

    if show:
        yield
        return
    shown = (
        datasets.is_progress_bar_enabled(),
        hf_logging.is_progress_bar_enabled(),
        not hub.are_progress_bars_disabled(),
    )
    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    hub.disable_progress_bars()
    gguf, gguf_bar = _gguf_module(), None
    if gguf is not None:  # its dequantising bar is a bare tqdm, which the switch above misses
        gguf_bar = gguf.tqdm
        gguf.tqdm = functools.partial(tqdm, disable=True)
    try:
        yield
    finally:
        if gguf is not None:
            gguf.tqdm = gguf_bar
        if shown[0]:
            datasets.enable_progress_bars()
        if shown[1]:
            hf_logging.enable_progress_bar()
        if shown[2]:
            hub.enable_progress_bars()
