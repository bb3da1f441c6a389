"""``logitstore verify``: check every checksum, size and shape of a store."""

from __future__ import annotations

import sys

import click


@click.command("verify")
@click.argument("store")
@click.option(
    "--storage-options",
    default=None,
    metavar="JSON",
    help="fsspec options as a JSON object, e.g. "
    '\'{"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}\'.',
)
def command(store: str, storage_options: str | None) -> None:
    """Check STORE's manifest and every shard; name each problem, exit 1 if any.

    Reads every shard in full (checksums, file sizes, array shapes, counts, decoding).
    An unreadable manifest is an error (exit 2).

    \b
    Examples:
      logitstore verify store/
      logitstore verify s3://bucket/stores/smollm2
    """
    from logitstore import open_store
    from logitstore.storage._fs import options_from_json

    opened = open_store(store, options_from_json(storage_options))
    problems = opened.verify()
    for problem in problems:
        click.echo(f"problem: {problem}", err=True)
    if problems:
        click.echo(f"{len(problems)} problem(s) in {store}", err=True)
        sys.exit(1)
    click.echo(
        f"ok: {opened.num_shards} shards, {opened.num_documents} documents, "
        f"{opened.num_tokens} tokens verified"
    )
