"""``logitstore push``: upload a store to the Hugging Face Hub as a dataset."""

from __future__ import annotations

import click


@click.command("push")
@click.argument("store")
@click.argument("repo_id")
@click.option(
    "--license",
    "license_id",
    default=None,
    help="License of the dataset card, a Hub license identifier (apache-2.0, mit, cc-by-4.0, "
    "other, ...). Required unless STORE is an export whose card has one.",
)
@click.option("--private", is_flag=True, help="Create the dataset repository private.")
@click.option("--revision", default=None, help="Branch to upload to (created if missing).")
@click.option("--max-support", type=int, default=None, help="Decoded view truncation (see export).")
def command(
    store: str,
    repo_id: str,
    license_id: str | None,
    private: bool,
    revision: str | None,
    max_support: int | None,
) -> None:
    """Upload STORE to the Hub dataset REPO_ID, exporting it first unless it is an export.

    The upload is resumable: it goes up in several commits, and if it is interrupted,
    running the same command again continues where it stopped. For a big store, export it
    once (`logitstore export STORE OUT`) and push OUT, so a second run does not export again.
    The token comes from HF_TOKEN or the one saved by `hf auth login`.

    \b
    Examples:
      logitstore push store/ my-org/smollm2-logits --license apache-2.0 --private
      logitstore push export/ my-org/smollm2-logits --license mit --revision v2
    """
    from logitstore.hub import push_store

    url = push_store(
        store,
        repo_id,
        license=license_id,
        private=private,
        revision=revision,
        max_support=max_support,
        on_status=lambda line: click.echo(line, err=True),
    )
    click.echo(f"pushed {store} to hf://datasets/{repo_id}: {url}")
