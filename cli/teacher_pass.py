"""``logitstore teacher-pass``: run a teacher over a dataset into a compressed store."""

from __future__ import annotations

import dataclasses
from typing import Any

import click

from logitstore.cli._options import backend_choice
from logitstore.cli._options import storage_options as _storage_options
from logitstore.codecs import CODECS, VALUE_OPTIONS
from logitstore.errors import ConfigError
from logitstore.pipelines.teacher_pass import TeacherPassConfig, format_summary, run_teacher_pass


def _temperatures(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    if value is None:
        return None
    try:
        return tuple(float(t) for t in value.split(",") if t.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, found {value!r}") from None


def _default(codec: str, parameter: str) -> Any:
    """The codec class's default for ``parameter``: the one place defaults are set."""
    return next(f.default for f in dataclasses.fields(CODECS[codec]) if f.name == parameter)


def _default_field(name: str) -> Any:
    return next(f.default for f in dataclasses.fields(TeacherPassConfig) if f.name == name)


@click.command("teacher-pass")
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False),
    help="YAML file of settings (the option names with underscores); options given on the command line override it.",
)
@click.option("--teacher", help="Teacher: Hub id, local model directory, or path to a .gguf file.")
@click.option(
    "--gguf-file", help="GGUF file name inside --teacher (loaded and dequantised by transformers)."
)
@click.option("--revision", help="Hub revision (branch, tag or commit) of the teacher.")
@click.option(
    "--dtype",
    type=click.Choice(["float32", "bfloat16", "float16"]),
    help="Teacher dtype. [default: bfloat16 on CUDA, float32 on CPU]",
)
@click.option("--device", help="Torch device, e.g. cuda:0 or cpu. [default: cuda if available]")
@click.option(
    "--device-map",
    help="Place the teacher across this process's devices with accelerate: auto, balanced, "
    "balanced_low_0, sequential, or a JSON file of module name to device (a GPU index, cpu or "
    "disk). Instead of --device.",
)
@click.option(
    "--max-memory",
    help="Per-device budget for --device-map, e.g. 0=20GiB,1=20GiB,cpu=60GiB; what does not "
    "fit goes to the next device, then the CPU, then the disk.",
)
@click.option(
    "--offload-folder",
    help="Folder for weights a device map sends to disk. [default: a temporary folder]",
)
@click.option(
    "--tensor-parallel",
    type=click.IntRange(min=1),
    help="Under torchrun: ranks that share one teacher, sharded by transformers' tensor "
    "parallelism; groups of this many ranks split the shards. [default: 1]",
)
@click.option(
    "--trust-remote-code/--no-trust-remote-code",
    default=None,
    help="Allow the teacher's own code to run.",
)
@click.option(
    "--data",
    help="A Hub dataset id; a local file (.json, .jsonl, .jsonl.gz, .csv, .tsv, .parquet, "
    ".arrow, .txt; a .txt file is one document); a folder of them, with its split files and "
    "README.md configs read as on the Hub; or a save_to_disk folder.",
)
@click.option(
    "--split",
    help="Split of a folder, Hub or saved dataset (a file is one split, train), or part of "
    "one: train[:1000], train[:10%]. [default: train]",
)
@click.option("--subset", help="Subset (config name) of a Hub dataset or of a folder's README.md.")
@click.option("--data-revision", help="Hub revision (branch, tag or commit) of the dataset.")
@click.option(
    "--streaming/--no-streaming",
    default=None,
    help="Stream a Hub dataset instead of downloading and preparing it first (not cached).",
)
@click.option(
    "--num-proc", type=click.IntRange(min=1), help="Processes preparing and tokenizing the data."
)
@click.option(
    "--cache-dir",
    help="datasets cache for the prepared data and its tokenized windows, which a resumed run "
    "and the other torchrun ranks reuse. [default: HF_DATASETS_CACHE]",
)
@click.option("--text-field", help="Field holding plain text. [default: text]")
@click.option(
    "--messages-field",
    help="Field holding chat messages; rendered with the teacher's chat template, assistant turns trained.",
)
@click.option("--limit", type=int, help="Use only the first N rows.")
@click.option("--out", help="Output store: local path or fsspec URL (s3://, memory://, ...).")
@click.option(
    "--codec",
    type=click.Choice(list(CODECS)),
    help="Codec; --k, --values, --draws and --bits set its parameters (a --config file may "
    f"give codec: {{name: topk, k: 128, values: q6}}). [default: {_default_field('codec')}]",
)
@click.option("--k", type=int, help=f"topk: support size. [default: {_default('topk', 'k')}]")
@click.option(
    "--values",
    type=click.Choice(VALUE_OPTIONS),
    help=f"topk: value precision. [default: {_default('topk', 'values')}]",
)
@click.option(
    "--draws", type=int, help=f"sampled: draws per position. [default: {_default('sampled', 'n')}]"
)
@click.option("--bits", type=int, help=f"dense: 8 or 4. [default: {_default('dense', 'bits')}]")
@click.option(
    "--backend",
    type=backend_choice(),
    help=f"Store backend. [default: {_default_field('backend')}]",
)
@click.option("--max-length", type=int, help="Most tokens per window. [default: 2048]")
@click.option(
    "--no-windowing",
    "windowing",
    flag_value=False,
    default=None,
    help="Refuse documents longer than --max-length instead of splitting them.",
)
@click.option("--batch-size", type=int, help="Windows per forward. [default: 8]")
@click.option(
    "--temperatures",
    callback=_temperatures,
    help="Comma-separated capture temperatures; 1.0 is always captured. [default: 1.0]",
)
@click.option(
    "--seed", type=int, help="Seed for sampled codecs and the fidelity sample. [default: 0]"
)
@click.option("--docs-per-shard", type=int, help="Documents (windows) per shard. [default: 256]")
@click.option(
    "--compression-level",
    type=int,
    help="zstd level of every array, -7 to 22. 19 stores about 5 % fewer bytes than 9 at the "
    "same decoding speed, but compresses about 6x slower. [default: 9]",
)
@click.option(
    "--fidelity-positions",
    type=int,
    help="Positions per shard measured against the dense teacher. [default: 256]",
)
@click.option(
    "--resume/--no-resume",
    default=None,
    help="Continue an interrupted run: skip committed shards (--no-resume: not, as a config "
    "file may say).",
)
@_storage_options("a remote --out")
@click.option("--no-progress", "progress", flag_value=False, default=None, help="No progress bar.")
def command(config_file: str | None, **options: Any) -> None:
    """Run a teacher once over a dataset and store its distributions compressed.

    \b
    Examples:
      logitstore teacher-pass --teacher HuggingFaceTB/SmolLM2-135M-Instruct \\
          --data corpus.jsonl --out store/ --codec topk --k 128 --values q6
      logitstore teacher-pass --teacher TEACHER --data HuggingFaceFW/fineweb-edu \\
          --subset sample-10BT --split train --streaming --limit 20000 --out store/
      logitstore teacher-pass --teacher TEACHER --data ./my-dataset --split test \\
          --num-proc 8 --out store/          # a local clone of a Hub dataset
      logitstore teacher-pass --teacher TEACHER --data docs.jsonl.gz --out store/
      logitstore teacher-pass --teacher models/ --gguf-file SmolLM2-135M-Instruct.Q4_1.gguf \\
          --data chats.jsonl --messages-field messages --out store/ --max-length 1024
      torchrun --nproc-per-node 4 -m logitstore.pipelines.teacher_pass --teacher TEACHER --data DATA \\
          --out s3://bucket/store --resume
      logitstore teacher-pass --teacher meta-llama/Llama-3.1-70B-Instruct --data DATA \\
          --out store/ --device-map auto --max-memory 0=60GiB,1=60GiB,2=60GiB
      torchrun --nproc-per-node 8 -m logitstore.pipelines.teacher_pass --teacher TEACHER --data DATA \\
          --out store/ --tensor-parallel 4
    """
    given = {k: v for k, v in options.items() if v is not None}
    if config_file:
        cfg = TeacherPassConfig.from_yaml(config_file, **given)
    else:
        missing = [f"--{k}" for k in ("teacher", "data", "out") if k not in given]
        if missing:
            raise ConfigError(f"missing required options {', '.join(missing)} (or a --config file)")
        cfg = TeacherPassConfig.from_dict(given)
    click.echo(format_summary(run_teacher_pass(cfg)))
