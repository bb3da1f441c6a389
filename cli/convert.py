"""``logitstore convert``: copy a store into another backend, losslessly."""

from __future__ import annotations

import click

from logitstore.cli._options import backend_choice
from logitstore.cli._options import storage_options as _storage_options


@click.command("convert")
@click.argument("store")
@click.argument("out")
@click.option("--backend", required=True, type=backend_choice(), help="Output backend.")
@click.option("--resume", is_flag=True, help="Continue an interrupted conversion into OUT.")
@click.option(
    "--compression-level", type=int, default=None, help="zstd level (default: the source's)."
)
@_storage_options("STORE")
@click.option("--no-progress", is_flag=True, default=False, help="No progress bar.")
def command(
    store: str,
    out: str,
    backend: str,
    resume: bool,
    compression_level: int | None,
    storage_options: dict | None,
    no_progress: bool,
) -> None:
    """Convert STORE to BACKEND at OUT; the encoded arrays are copied, never re-encoded.

    OUT gets its manifest only once every shard is written, so an interrupted
    conversion is never mistaken for a store; finish it with --resume.

    \b
    Examples:
      logitstore convert store/ --backend parquet store-parquet/
      logitstore convert store-parquet/ --backend zarr store-zarr/ --resume
      logitstore convert s3://bucket/store --backend parquet store-parquet/ \\
          --storage-options '{"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}'
    """
    from logitstore import convert_store, open_store
    from logitstore.pipelines._progress import progress_bar

    total = open_store(store, storage_options).num_shards
    with progress_bar(total, show=not no_progress, unit="shard", desc="convert") as bar:
        manifest = convert_store(
            store,
            out,
            backend=backend,
            resume=resume,
            compression_level=compression_level,
            storage_options=storage_options,
            on_shard=lambda _: bar.update(1),
        )
    stats = manifest["statistics"]
    click.echo(
        f"wrote {out}: {stats['documents']} documents, {stats['tokens']} tokens, "
        f"{stats['bytes_per_token']:.2f} bytes/token ({backend})"
    )
