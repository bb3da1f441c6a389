"""``logitstore train``: train a student from a logit store."""

from __future__ import annotations

import click
import yaml

from logitstore.cli._options import storage_options as _storage_options
from logitstore.errors import ConfigError
from logitstore.pipelines._yaml import load_yaml


def parse_params(pairs: tuple[str, ...]) -> dict:
    """``("gamma=0.5", "target=label")`` -> ``{"gamma": 0.5, "target": "label"}`` (YAML values)."""
    params = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--param expects KEY=VALUE, found {pair!r}")
        try:
            params[key.strip()] = load_yaml(value)
        except yaml.YAMLError:
            raise ConfigError(
                f"--param {key.strip()}: cannot read {value!r} as a value (a YAML number, "
                "string or list)"
            ) from None
    return params


def _numbers(option: str, text: str, kind: type, example: str) -> list:
    """``"0.9,0.95"`` -> ``[0.9, 0.95]``; a clean error naming ``option`` otherwise."""
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(
            f"{option} expects comma-separated {kind.__name__}s, e.g. {example}; found {text!r}"
        ) from None


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
@click.option(
    "--tokens-per-step",
    type=int,
    help="Padded tokens per optimizer step, all ranks: the step accumulates "
    "ceil(this / (ranks x --tokens-per-batch)) micro-batches. [default: 16384]",
)
@click.option(
    "--tokens-per-batch",
    type=int,
    help="Padded tokens per micro-batch (whole documents). [default: 8192]",
)
@click.option("--lr", type=float, help="Peak learning rate.")
@click.option("--warmup-steps", type=int, help="Linear warm-up steps before cosine decay.")
@click.option("--seed", type=int, help="Seed for data order and random initialisation.")
@click.option("--save-every", type=int, help="Checkpoint every N steps (0: only at the end).")
@click.option(
    "--eval-store",
    help="A held-out store (the same teacher on other documents): the objective and the "
    "teacher metrics on it go to OUT/eval.jsonl.",
)
@click.option(
    "--eval-every",
    type=int,
    help="Evaluate on --eval-store every N steps; the last step always is. [default: 0, "
    "the last step only]",
)
@click.option(
    "--resume/--no-resume",
    default=None,
    help="Continue from the last checkpoint (--no-resume: start over, as a config file may not).",
)
@click.option("--temperature", type=float, help="Distillation temperature (must be captured).")
@click.option("--ce-weight", type=float, help="Weight of cross-entropy with the labels.")
@click.option(
    "--approximate-tail/--no-approximate-tail",
    default=None,
    help="Allow an uncaptured temperature: spread the teacher's tail uniformly (approximate).",
)
@click.option(
    "--use-counts/--no-use-counts",
    default=None,
    help="RS-KD: fkl against the draw counts of a sampled store.",
)
@click.option("--min-lr-ratio", type=float, help="Final LR of the cosine decay, over the peak.")
@click.option("--weight-decay", type=float, help="AdamW weight decay (not on norms, biases).")
@click.option("--betas", help="AdamW betas, e.g. 0.9,0.95.")
@click.option("--grad-clip", type=float, help="Clip the gradient norm to this (0: off).")
@click.option("--chunk-size", type=int, help="Tokens whose logits the fused loss forms at once.")
@click.option("--shuffle-window", type=int, help="Shards whose documents are shuffled together.")
@click.option("--num-workers", type=int, help="DataLoader processes decoding the store.")
@click.option("--keep-checkpoints", type=int, help="Complete checkpoints kept (0: all).")
@click.option("--log-every", type=int, help="Log a metrics row every N steps.")
@click.option(
    "--precision",
    type=click.Choice(["fp32", "bf16", "fp16"]),
    help="Mixed precision of the student's compute. [default: fp32]",
)
@click.option(
    "--student-dtype",
    help="dtype the student is loaded and saved in: auto (its own) or e.g. float32.",
)
@click.option("--fsdp/--no-fsdp", default=None, help="Shard the student with FSDP2 (torchrun).")
@click.option(
    "--deepspeed",
    type=click.Path(exists=True, dir_okay=False),
    help="DeepSpeed JSON config (e.g. ZeRO-3); needs the deepspeed package.",
)
@click.option(
    "--lora-r", type=int, help="Train LoRA adapters of this rank (PEFT), not all weights."
)
@click.option("--lora-alpha", type=int, help="LoRA scaling alpha. [default: 16]")
@click.option("--lora-dropout", type=float, help="LoRA dropout. [default: 0]")
@click.option("--lora-targets", help="Comma-separated module names for LoRA (default: all linear).")
@click.option(
    "--gradient-checkpointing/--no-gradient-checkpointing",
    default=None,
    help="Recompute activations in backward (less memory, more time).",
)
@click.option(
    "--report-to",
    help="Tracker for metrics as Trainer knows them (tensorboard, wandb, ...). [default: none]",
)
@click.option(
    "--tokenizer",
    help="Student tokenizer (Hub id, directory or .gguf file), if not with the student.",
)
@click.option(
    "--init-from",
    help="Teacher to copy embeddings, head and --keep-layers from: Hub id, model directory "
    "or .gguf file.",
)
@click.option("--keep-layers", help="Comma-separated teacher layers, e.g. 0,2,4.")
@click.option("--device", help="torch device (default: CUDA if available).")
@_storage_options("a remote --store")
@click.option(
    "--cache-dir", help="Keep verified shards of a remote store here (later epochs read them)."
)
@click.option("--readahead", type=int, help="Shards fetched in the background. [default: 2]")
@click.option("--no-progress", is_flag=True, default=False, help="No progress bar.")
def command(config_file, params, keep_layers, betas, lora_targets, no_progress, **options) -> None:
    """Train a student on a teacher's logit store.

    Runs on Hugging Face Trainer: one process, or under torchrun for data parallelism
    (gloo on CPU, NCCL on CUDA), with --fsdp or --deepspeed to shard a student that does
    not fit one device, --lora-r for adapters, --precision bf16 for mixed precision.

    \b
    Examples:
      logitstore train --store store/ --student HuggingFaceTB/SmolLM2-135M \\
          --divergence drkl --param gamma=0.5 --out run/ --max-steps 1000
      logitstore train --store store/ --student config.json --divergence fkl \\
          --out run/ --tokens-per-step 65536 --save-every 200
      logitstore train --store train-store/ --eval-store held-out-store/ --eval-every 100 \\
          --student config.json --out run/ --max-steps 1000
      logitstore train --store store/ --student small.json --init-from teacher/ \\
          --keep-layers 0,2,4,6 --out run/ --temperature 2.0 --ce-weight 0.1
      logitstore train --config run.yaml --stop-after 300
      logitstore train --config run.yaml --resume
      torchrun --nproc-per-node 2 $(which logitstore) train --config run.yaml
      torchrun --nproc-per-node 8 $(which logitstore) train --config run.yaml \\
          --fsdp --precision bf16 --gradient-checkpointing --report-to tensorboard
      logitstore train --store store/ --student HuggingFaceTB/SmolLM2-1.7B \\
          --out run/ --lora-r 16 --lora-targets q_proj,v_proj --max-steps 500
      torchrun --nproc-per-node 8 $(which logitstore) train --config run.yaml \\
          --deepspeed zero3.json --precision bf16
      logitstore train --store hf://datasets/ORG/NAME --student config.json --out run/ \\
          --cache-dir ~/.cache/logitstore
      logitstore train --store s3://bucket/store --storage-options '{"anon": true}' \\
          --student config.json --out run/
    """
    from logitstore.pipelines.train import TrainConfig, train_and_print

    overrides = dict(options)
    if params:
        overrides["params"] = parse_params(params)
    if keep_layers:
        overrides["keep_layers"] = _numbers("--keep-layers", keep_layers, int, "0,2,4")
    if betas:
        overrides["betas"] = tuple(_numbers("--betas", betas, float, "0.9,0.95"))
    if lora_targets:
        overrides["lora_targets"] = [x.strip() for x in lora_targets.split(",") if x.strip()]
    if no_progress:
        overrides["progress"] = False
    if config_file:
        config = TrainConfig.from_yaml(config_file, **overrides)
    else:
        missing = [k for k in ("store", "student", "out") if not overrides.get(k)]
        if missing:
            raise click.UsageError(f"missing {', '.join('--' + m for m in missing)} (or --config)")
        config = TrainConfig(**{k: v for k, v in overrides.items() if v is not None})
    train_and_print(config)  # the JSON summary alone on stdout, once under torchrun
