"""``logitstore push``: upload a store to the Hugging Face Hub as a dataset."""

from __future__ import annotations

import click


@click.command("push")
@click.argument("store")
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the dataset repository private.")
@click.option("--revision", default=None, help="Branch to upload to (created if missing).")
@click.option("--max-support", type=int, default=None, help="Decoded view truncation (see export).")
def command(
    store: str, repo_id: str, private: bool, revision: str | None, max_support: int | None
) -> None:
    """Upload STORE to the Hub dataset REPO_ID, exporting it first unless it is an export.

    The token comes from HF_TOKEN or the one saved by `hf auth login`.

    \b
    Examples:
      logitstore push store/ my-org/smollm2-logits --private
      logitstore push export/ my-org/smollm2-logits --revision v2
    """
    from logitstore.hub import push_store

    url = push_store(store, repo_id, private=private, revision=revision, max_support=max_support)
    click.echo(f"pushed {store} to hf://datasets/{repo_id}: {url}")
