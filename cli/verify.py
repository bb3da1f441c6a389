"""``logitstore verify``: check every checksum, size, shape and value of a store."""

from __future__ import annotations

import sys

import click

from logitstore.cli._options import storage_options as _storage_options


@click.command("verify")
@click.argument("store")
@_storage_options()
def command(store: str, storage_options: dict | None) -> None:
    """Check STORE's manifest and every shard; name each problem, exit 1 if any.

    Reads every shard in full (checksums, file sizes, array shapes, counts, decoding) and
    checks every position's values (ids in the vocabulary, no NaN, log-probs <= 0, support
    plus tail mass <= 1), naming the first bad position of each shard. An unreadable or
    malformed manifest is an error (exit 2).

    \b
    Examples:
      logitstore verify store/
      logitstore verify s3://bucket/stores/smollm2
    """
    from logitstore import open_store

    opened = open_store(store, storage_options)
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
