"""``logitstore verify``: check every checksum, size, shape and value of a store."""

from __future__ import annotations

import sys

import click

from logitstore.cli._options import storage_options as _storage_options


@click.command("verify")
@click.argument("store")
@_storage_options()
@click.option("--no-progress", is_flag=True, default=False, help="No progress bar.")
def command(store: str, storage_options: dict | None, no_progress: bool) -> None:
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
    from logitstore.pipelines._progress import progress_bar

    opened = open_store(store, storage_options)
    with progress_bar(opened.num_shards, show=not no_progress, unit="shard", desc="verify") as bar:
        problems = opened.verify(on_shard=lambda _: bar.update(1))
    for problem in problems:
        click.echo(f"problem: {problem}", err=True)
    if problems:
        click.echo(f"{len(problems)} problem(s) in {store}", err=True)
        sys.exit(1)
    click.echo(
        f"ok: {opened.num_shards} shards, {opened.num_documents} documents, "
        f"{opened.num_tokens} tokens verified"
    )
