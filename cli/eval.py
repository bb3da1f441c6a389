"""``logitstore eval``: compare a student with the teacher recorded in a store."""

from __future__ import annotations

import json

import click

from logitstore.cli._options import storage_options as _storage_options


@click.command("eval")
@click.option("--student", required=True, help="Model directory or Hub id (e.g. a checkpoint).")
@click.option("--store", required=True, help="Held-out store URL.")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
@click.option(
    "--prompts",
    type=click.Path(exists=True, dir_okay=False),
    help="Prompts (one per line, or JSONL) for generation diversity.",
)
@click.option(
    "--num-samples",
    type=int,
    default=4,
    show_default=True,
    help="Samples per prompt for diversity.",
)
@click.option("--max-new-tokens", type=int, default=32, show_default=True)
@click.option("--max-documents", type=int, help="Evaluate on the first N documents only.")
@click.option("--tokens-per-batch", type=int, default=8192, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", help="torch device (default: CUDA if available).")
@_storage_options()
@click.option("--no-progress", is_flag=True, default=False, help="No progress bar.")
def command(
    student,
    store,
    as_json,
    prompts,
    num_samples,
    max_new_tokens,
    max_documents,
    tokens_per_batch,
    seed,
    device,
    storage_options,
    no_progress,
) -> None:
    """Per-token teacher KL, top-1 agreement, calibration and entropy of a student.

    \b
    Examples:
      logitstore eval --student run/checkpoints/checkpoint-1000 --store heldout/
      logitstore eval --student run/final --store heldout/ --prompts prompts.txt --json
      logitstore eval --student run/final --store s3://bucket/heldout \\
          --storage-options '{"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}'
    """
    from logitstore.pipelines.evaluate import evaluate

    result = evaluate(
        student,
        store,
        tokens_per_batch=tokens_per_batch,
        prompts=prompts,
        num_samples=num_samples,
        max_new_tokens=max_new_tokens,
        max_documents=max_documents,
        seed=seed,
        device=device,
        storage_options=storage_options,
        progress=not no_progress,
    )
    if as_json:
        click.echo(json.dumps(result, indent=1))
        return
    width = max(len(k) for k in result)
    for key, value in result.items():
        shown = f"{value:.6g}" if isinstance(value, float) else str(value)
        click.echo(f"{key:<{width}}  {shown}")
