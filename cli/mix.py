"""``logitstore mix``: one store holding a weighted mixture of several teachers' stores."""

from __future__ import annotations

import click

from logitstore.cli._options import backend_choice
from logitstore.cli._options import storage_options as _storage_options
from logitstore.errors import ConfigError


@click.command("mix")
@click.argument("stores", nargs=-1, required=True)
@click.option("--out", required=True, help="Output store (new, empty location).")
@click.option(
    "--weights",
    default=None,
    help="Comma-separated weights, one per store (normalised). [default: equal]",
)
@click.option(
    "--k",
    type=int,
    default=None,
    help="Output support size. [default: the largest union of the input supports]",
)
@click.option("--backend", type=backend_choice(), default=None, help="[default: the first store's]")
@_storage_options("STORES")
@click.option("--no-progress", is_flag=True, default=False, help="No progress bar.")
def command(
    stores: tuple[str, ...],
    out: str,
    weights: str | None,
    k: int | None,
    backend: str | None,
    storage_options: dict | None,
    no_progress: bool,
) -> None:
    """Mix STORES (same documents and tokenizer) into OUT, weighted by --weights.

    Teacher probabilities outside a store's support are estimated by spreading its tail
    uniformly; the manifest records this approximation (teacher.mixture).

    \b
    Examples:
      logitstore mix store-a/ store-b/ --out mixed/ --weights 0.7,0.3
    """
    from logitstore import open_store
    from logitstore.codecs import get_codec
    from logitstore.mixture import mix_stores, naming
    from logitstore.pipelines._progress import progress_bar

    try:
        w = None if weights is None else [float(x) for x in weights.split(",")]
    except ValueError:
        raise ConfigError(f"--weights expects comma-separated numbers, found {weights!r}") from None
    with naming(stores[0]):
        first = open_store(stores[0], storage_options)
    codec = None
    if k is not None:
        codec = get_codec("topk", k=min(k, first.vocab_size), values="float32")
    with progress_bar(first.num_shards, show=not no_progress, unit="shard", desc="mix") as bar:
        manifest = mix_stores(
            list(stores),
            out,
            weights=w,
            codec=codec,
            backend=backend,
            storage_options=storage_options,
            on_shard=lambda _: bar.update(1),
        )
    stats = manifest["statistics"]
    click.echo(
        f"mixed {len(stores)} stores into {out}: {stats['documents']} documents, "
        f"weights {manifest['teacher']['mixture']['weights']}"
    )
