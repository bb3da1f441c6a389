"""Options several subcommands share, defined once."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click


def _parse_storage_options(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    from logitstore.storage._fs import options_from_json

    return options_from_json(value)


F = TypeVar("F", bound=Callable[..., Any])


def backend_choice() -> click.Choice:
    """The registered storage backends (``logitstore.storage.BACKENDS``) as a click choice."""
    from logitstore.storage import BACKENDS

    return click.Choice(list(BACKENDS))


def storage_options(what: str = "the store") -> Callable[[F], F]:
    """``--storage-options JSON``, parsed into a dict (``None`` when not given)."""
    return click.option(
        "--storage-options",
        metavar="JSON",
        callback=_parse_storage_options,
        help=f"fsspec options of {what} as a JSON object, e.g. "
        '\'{"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}\'.',
    )
