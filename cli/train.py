"""``logitstore train``: train a student from a logit store."""

from __future__ import annotations

import json

import click
import yaml

from cli._options import storage_options as _storage_options
from logitstore.errors import ConfigError


def parse_params(pairs: tuple[str, ...]) -> dict:
    """``("gamma=0.5", "target=label")`` -> ``{"gamma": 0.5, "target": "label"}`` (YAML values)."""
    params = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--param expects KEY=VALUE, found {pair!r}")
        params[key.strip()] = yaml.safe_load(value)
    return params


@click.command("train")
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False),
    help="YAML file of training settings; options given here override it.",
)
@click.option("--store", help="Store URL (local path or fsspec URL).")
@click.option("--student", help="Hub id, model directory, or model config file (random init).")
@click.option("--divergence", help="Objective name, e.g. fkl, rkl, jsd, akl, taid, drkl.")
@click.option(
    "--param",
    "params",
    multiple=True,
    metavar="KEY=VALUE",
    help="Objective parameter, repeatable: --param gamma=0.5.",
)
@click.option("--out", help="Run directory: checkpoints, metrics.jsonl.")
@click.option("--max-steps", type=int, help="Optimizer steps (the LR schedule spans them).")
@click.option(
    "--stop-after",
    type=int,
    help="Stop at this step (the schedule still spans --max-steps); resume later.",
)
@click.option("--tokens-per-step", type=int, help="Trained tokens per optimizer step, all ranks.")
@click.option("--tokens-per-batch", type=int, help="Padded tokens per micro-batch.")
@click.option("--lr", type=float, help="Peak learning rate.")
@click.option("--warmup-steps", type=int, help="Linear warm-up steps before cosine decay.")
@click.option("--seed", type=int, help="Seed for data order and random initialisation.")
@click.option("--save-every", type=int, help="Checkpoint every N steps (0: only at the end).")
@click.option("--resume", is_flag=True, default=None, help="Continue from the last checkpoint.")
@click.option("--temperature", type=float, help="Distillation temperature (must be captured).")
@click.option("--ce-weight", type=float, help="Weight of cross-entropy with the labels.")
@click.option(
    "--approximate-tail",
    is_flag=True,
    default=None,
    help="Allow an uncaptured temperature: spread the teacher's tail uniformly (approximate).",
)
@click.option(
    "--use-counts",
    is_flag=True,
    default=None,
    help="RS-KD: fkl against the draw counts of a sampled store.",
)
@click.option("--tokenizer", help="Student tokenizer, if not with the student.")
@click.option("--init-from", help="Teacher to copy embeddings, head and --keep-layers from.")
@click.option("--keep-layers", help="Comma-separated teacher layers, e.g. 0,2,4.")
@click.option("--device", help="torch device (default: CUDA if available).")
@_storage_options("a remote --store")
@click.option(
    "--cache-dir", help="Keep verified shards of a remote store here (later epochs read them)."
)
@click.option("--readahead", type=int, help="Shards fetched in the background. [default: 2]")
@click.option("--no-progress", is_flag=True, default=False, help="No progress bar.")
def command(config_file, params, keep_layers, no_progress, **options) -> None:
    """Train a student on a teacher's logit store.

    Runs on one process, or under torchrun for data parallelism (gloo on CPU, NCCL on CUDA).

    \b
    Examples:
      logitstore train --store store/ --student HuggingFaceTB/SmolLM2-135M \\
          --divergence drkl --param gamma=0.5 --out run/ --max-steps 1000
      logitstore train --store store/ --student config.json --divergence fkl \\
          --out run/ --tokens-per-step 65536 --save-every 200
      logitstore train --config run.yaml --resume
      torchrun --nproc-per-node 2 $(which logitstore) train --config run.yaml
      logitstore train --store hf://datasets/ORG/NAME --student config.json --out run/ \\
          --cache-dir ~/.cache/logitstore
    """
    from pipelines.train import TrainConfig, train

    overrides = dict(options)
    if params:
        overrides["params"] = parse_params(params)
    if keep_layers:
        overrides["keep_layers"] = [int(x) for x in keep_layers.split(",")]
    if no_progress:
        overrides["progress"] = False
    if config_file:
        config = TrainConfig.from_yaml(config_file, **overrides)
    else:
        missing = [k for k in ("store", "student", "out") if not overrides.get(k)]
        if missing:
            raise click.UsageError(f"missing {', '.join('--' + m for m in missing)} (or --config)")
        config = TrainConfig(**{k: v for k, v in overrides.items() if v is not None})
    summary = train(config)
    click.echo(json.dumps(summary, indent=1, default=str))
