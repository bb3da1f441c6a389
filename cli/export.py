"""``logitstore export``: a Hub-ready folder (store, decoded view, dataset card)."""

from __future__ import annotations

import click

from logitstore.cli._options import storage_options as _storage_options


@click.command("export")
@click.argument("store")
@click.argument("out")
@click.option(
    "--max-support",
    type=int,
    default=None,
    help="Keep at most this many support entries per position in the decoded view (the "
    "store itself stays complete); useful for dense stores.",
)
@click.option("--repo-id", default=None, help="ORG/NAME the dataset card's examples use.")
@click.option(
    "--license",
    "license_id",
    default=None,
    help="License of the dataset card, a Hub license identifier (apache-2.0, mit, cc-by-4.0, "
    "other, ...); `logitstore push` needs one, here or there.",
)
@_storage_options()
@click.option("--no-progress", is_flag=True, default=False, help="No progress bar.")
def command(
    store: str,
    out: str,
    max_support: int | None,
    repo_id: str | None,
    license_id: str | None,
    storage_options: dict | None,
    no_progress: bool,
) -> None:
    """Export STORE to OUT: a parquet store plus a decoded view and a dataset card.

    OUT opens with `logitstore` (open_store, train, verify) and with
    `datasets.load_dataset(OUT)`, which reads the decoded view in data/.

    \b
    Examples:
      logitstore export store/ export/ --repo-id my-org/smollm2-logits --license mit
      logitstore export s3://bucket/store export/ --max-support 64
    """
    from logitstore import open_store
    from logitstore.hub import export_store
    from logitstore.pipelines._progress import progress_bar

    total = open_store(store, storage_options).num_shards
    with progress_bar(total, show=not no_progress, unit="shard", desc="export") as bar:
        manifest = export_store(
            store,
            out,
            max_support=max_support,
            repo_id=repo_id,
            storage_options=storage_options,
            out_storage_options={},
            on_shard=lambda _: bar.update(1),
            license=license_id,
        )
    stats = manifest["statistics"]
    click.echo(
        f"exported {out}: {stats['documents']} documents, {stats['tokens']} tokens; "
        f"README.md, manifest.json, shards/ (store), data/ (decoded view)"
    )
