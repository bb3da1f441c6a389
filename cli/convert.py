"""``logitstore convert``: copy a store into another backend, losslessly."""

from __future__ import annotations

import click

from logitstore.cli._options import backend_choice


@click.command("convert")
@click.argument("store")
@click.argument("out")
@click.option("--backend", required=True, type=backend_choice(), help="Output backend.")
@click.option("--resume", is_flag=True, help="Continue an interrupted conversion into OUT.")
@click.option(
    "--compression-level", type=int, default=None, help="zstd level (default: the source's)."
)
def command(
    store: str, out: str, backend: str, resume: bool, compression_level: int | None
) -> None:
    """Convert STORE to BACKEND at OUT; the encoded arrays are copied, never re-encoded.

    OUT gets its manifest only once every shard is written, so an interrupted
    conversion is never mistaken for a store; finish it with --resume.

    \b
    Examples:
      logitstore convert store/ --backend parquet store-parquet/
      logitstore convert store-parquet/ --backend zarr store-zarr/ --resume
    """
    from tqdm import tqdm

    from logitstore import convert_store, open_store

    total = open_store(store).num_shards
    with tqdm(total=total, unit="shard", desc="convert") as bar:
        manifest = convert_store(
            store,
            out,
            backend=backend,
            resume=resume,
            compression_level=compression_level,
            on_shard=lambda _: bar.update(1),
        )
    stats = manifest["statistics"]
    click.echo(
        f"wrote {out}: {stats['documents']} documents, {stats['tokens']} tokens, "
        f"{stats['bytes_per_token']:.2f} bytes/token ({backend})"
    )
