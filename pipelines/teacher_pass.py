"""Stage one: run a teacher once over a dataset and store its distributions compressed.

Reads top to bottom: setup (data and its windows, then the teacher, codec, shard plan, store),
loop (the main thread runs each batch's forward in inference mode and checks its logits for
NaN/Inf; a background worker takes the logits and encodes them on the device (the codec
normalises each row, computing the log-softmax, entropy and tail in one pass over the
vocabulary), copies only the encoded arrays to the host and commits each finished shard, so all
of that overlaps the next forward), save (finalize the manifest, summary). All resume state is
one dict, ``state``; the store itself is the checkpoint: committed shards are skipped on
``--resume``.

Memory: at most three batches of logits are alive (one in the forward, one queued, one being
encoded), plus a few float32 ``(T, V)`` temporaries of one window while it is encoded (one
copy of its logits when the model does not run in float32). The first batch is run once: the
codec is fitted on it (top-k's id order; one copy of its positions' logits in the model's dtype)
and the loop reuses its logits.

Shard policy: windows (see ``pipelines/_data.py``) in source order, ``docs_per_shard`` per
shard; shard ``i`` belongs to rank ``i % world_size``. Inside a shard, windows are sorted by
length (longest first, ties in source order) and batched, to waste little padding; the shard
stores them in source order. Sampled codecs draw from a generator seeded by ``(seed, doc_id)``,
so the stored bytes do not depend on batching, ranks or restarts.

Multi-process: launched by ``torchrun`` (``WORLD_SIZE > 1``), rank 0 reads and tokenizes the
data first and the others then read its windows from the ``datasets`` cache (on a node that does
not share its cache, that node's first rank makes them, then the others read); rank 0 creates or
resumes the store, the others join it, each writes its own shards, and rank 0 writes the
manifest after every rank succeeded. Run as ``python -m logitstore.pipelines.teacher_pass`` with the options of
``logitstore teacher-pass``.

Placement (``pipelines/_placement.py``): by default each process holds the whole teacher on its
device. ``device_map`` lets accelerate spread one process's teacher over its devices, the CPU and
the disk. ``tensor_parallel = N`` groups the ranks by N consecutive ranks; a group holds one
teacher sharded by transformers' tensor parallelism, every rank of it runs the same forwards
(they exchange activations), and only the group's first rank encodes and commits. Groups take
the place of ranks in the shard policy (shard ``i`` to group ``i % groups``), so a store is the
same however the ranks are grouped. Placement is not a setting: a resume may use another.

The settings (``TeacherPassConfig``) live in ``pipelines/_teacher_config.py``, the worker in
``pipelines/_encoder.py``, ranks and collectives in ``pipelines/_distributed.py``.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed

from logitstore.codecs import Codec, codec_from_json
from logitstore.errors import ConfigError, LogitstoreError, StoreNotFoundError
from logitstore.pipelines._data import (
    ISOLATION,
    WINDOWING_POLICY,
    Source,
    Window,
    build_windows,
    load_rows,
    source_field,
)
from logitstore.pipelines._distributed import (
    agree,
    any_failed,
    barrier,
    end_processes,
    init_processes,
    is_distributed,
    pick_device,
    tensor_parallel_group,
    tensor_parallel_groups,
)
from logitstore.pipelines._encoder import ShardBuffer, Worker
from logitstore.pipelines._progress import library_bars, progress_bar
from logitstore.pipelines._teacher import (
    Teacher,
    check_context,
    fit_codec,
    forward_batch,
    load_teacher,
    load_tokenizer,
    tokenizer_fingerprint,
)
from logitstore.pipelines._teacher_config import TeacherPassConfig
from logitstore.writer import StoreWriter, stored_settings

__all__ = [
    "TeacherPassConfig",
    "build_metadata",
    "format_summary",
    "plan_batches",
    "plan_shards",
    "run_teacher_pass",
]

_T = TypeVar("_T")

# -- shard policy --------------------------------------------------------------------------


def plan_shards(windows: Sequence[Window], docs_per_shard: int) -> list[list[Window]]:
    """Consecutive runs of ``docs_per_shard`` windows, in source order."""
    if docs_per_shard < 1:
        raise ConfigError(f"docs_per_shard must be >= 1, found {docs_per_shard}")
    return [list(windows[i : i + docs_per_shard]) for i in range(0, len(windows), docs_per_shard)]


def plan_batches(windows: Sequence[Window], batch_size: int) -> list[list[int]]:
    """Indices into ``windows``, longest first, in batches of ``batch_size`` (little padding)."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, found {batch_size}")
    order = sorted(range(len(windows)), key=lambda i: (-windows[i].num_tokens, i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


# -- multi-process ---------------------------------------------------------------------------


def _fitted_codec(
    codec: Codec,
    cfg: TeacherPassConfig,
    teacher: Teacher,
    shards: Sequence[Sequence[Window]],
    rank: int,
    world: int,
    group: int = 0,
) -> tuple[Codec, tuple[torch.Tensor, torch.Tensor] | None]:
    """Rank 0 fits the codec on shard 0's first batch; every other rank takes rank 0's.

    Under tensor parallelism every rank of rank 0's group (``group == 0``) runs the same fit,
    since a forward needs the whole group; they reach the same decision (fit or reuse the
    stored codec) from the same inputs, and rank 0's result is the one broadcast.

    Returns the codec and, where this rank ran the first batch to fit on, that batch's
    ``forward_batch`` output, which the loop reuses instead of running the batch again.
    """
    error: BaseException | None = None
    forwarded = None
    if group == 0:
        try:
            stored = stored_settings(cfg.out, cfg.storage_options) if cfg.resume else None
            first = [shards[0][j] for j in plan_batches(shards[0], cfg.batch_size)[0]]
            codec, forwarded = fit_codec(codec, teacher, first, resume_from=stored)
        except LogitstoreError as exc:
            error = exc
    agree(error, world, "fitting the codec")
    if world > 1:
        payload = [codec.to_json()]
        torch.distributed.broadcast_object_list(payload, src=0)
        codec = codec_from_json(payload[0])
    return codec, forwarded


def _rank_0_first(
    work: Callable[[], _T], rank: int, world: int, what: str, cached: bool = True
) -> _T:
    """``work()`` on rank 0, then on the first rank of each other node, then on the rest.

    Rank 0 downloads and prepares the dataset and writes its windows into ``datasets``' cache;
    the other ranks wait, then find both there. A node that does not share rank 0's cache (its
    own disk) computes them once, in its first rank's turn, and its other ranks find them in
    its cache (they all computed them at once, each with ``num_proc`` processes). Work that is
    not ``cached`` (a stream) takes no node turn: it would only wait for itself. A failure on
    any rank stops all.
    """
    result: _T | None = None
    error: BaseException | None = None
    node_first = cached and int(os.environ.get("LOCAL_RANK", rank)) == 0
    mine = 0 if rank == 0 else 1 if node_first else 2
    for turn in (0, 1, 2):  # rank 0's turn, each node's first rank's, everyone else's
        if mine == turn:
            try:
                result = work()
            except LogitstoreError as exc:
                error = exc
        agree(error, world, what)
    assert result is not None
    return result


def _load_source(cfg: TeacherPassConfig) -> Source:
    """The rows of ``cfg.data``, with the field the pass reads checked (no tokenizer needed)."""
    source = load_rows(
        cfg.data, split=cfg.split, subset=cfg.subset, revision=cfg.data_revision,
        streaming=cfg.streaming, limit=cfg.limit, cache_dir=cfg.cache_dir, num_proc=cfg.num_proc,
    )  # fmt: skip
    source_field(source, cfg.text_field, cfg.messages_field)
    return source


def _windows(cfg: TeacherPassConfig, source: Source, tokenizer: Any) -> list[Window]:
    return build_windows(
        source, tokenizer, max_length=cfg.max_length, text_field=cfg.text_field,
        messages_field=cfg.messages_field, windowing=cfg.windowing, num_proc=cfg.num_proc,
        cache_dir=cfg.cache_dir,
    )  # fmt: skip


def _submit(worker: Worker | None, tp_group: Any, device: torch.device, *job: Any) -> None:
    """Hand a job to the worker; in a tensor-parallel group, every rank learns of its failure.

    Only the group's first rank has a worker, so only it can fail here, and the others would
    meet it in mismatched collectives (the next forward's, and the error check's). Every rank of
    the group calls this once per batch and once per shard, after the forward, so a failure
    takes the whole group out of the loop at the same point.
    """
    failure: BaseException | None = None
    if worker is not None:
        try:
            worker.submit(*job)
        except BaseException as exc:  # noqa: BLE001 - re-raised below, after the group knows
            failure = exc
    if tp_group is not None and any_failed(failure is not None, tp_group, device):
        failure = failure or LogitstoreError("the first rank of this tensor-parallel group failed")
    if failure is not None:
        raise failure


# -- the pass ----------------------------------------------------------------------------------


def build_metadata(
    cfg: TeacherPassConfig, teacher: Teacher, source_meta: Mapping[str, Any]
) -> dict[str, Any]:
    """The store's ``teacher``, ``tokenizer``, ``capture`` and ``source`` sections."""
    return {
        "teacher": teacher.metadata,
        "tokenizer": tokenizer_fingerprint(teacher.tokenizer, teacher.vocab_size),
        "capture": {
            # The extra temperatures are the store's tail_temperatures (a format field).
            "base_temperature": 1.0,
            "max_length": cfg.max_length,
            "windowing": WINDOWING_POLICY if cfg.windowing else "off: longer documents refused",
            "isolation": ISOLATION,
            "docs_per_shard": cfg.docs_per_shard,
            "seed": cfg.seed,
            "fidelity_positions_per_shard": cfg.fidelity_positions,
            "logsoftmax_dtype": "float32",
        },
        "source": {
            **source_meta,
            "text_field": None if cfg.messages_field else cfg.text_field,
            "messages_field": cfg.messages_field,
            "limit": cfg.limit,
        },
    }


def run_teacher_pass(cfg: TeacherPassConfig, *, teacher: Teacher | None = None) -> dict[str, Any]:
    """Run the teacher pass described by ``cfg`` and return a summary.

    Under ``torchrun`` the pass joins the process group and, if it was the one to create it,
    leaves it before returning or raising (a gloo group left to interpreter exit can abort the
    process after its work is done).

    Args:
        cfg: the settings.
        teacher: an already loaded teacher (benchmarks reuse one, with its placement); by
            default it is loaded from ``cfg``'s teacher and placement settings.

    Returns:
        ``{"rank", "world_size", "shards", "shards_written", "documents", "tokens", "seconds",
        "placement", "manifest"}``; ``manifest`` is ``None`` on ranks other than 0;
        ``placement`` is :meth:`Placement.describe` with the device the logits came out on.
        Under tensor parallelism a group's other ranks write, and count, nothing.

    Raises:
        ConfigError: invalid settings, e.g. ``k`` larger than the vocabulary, or tensor
            parallelism for a model type without a plan (before any data is read or anything
            is written).
        DataError: an empty data source or unusable rows.
        SettingsMismatchError: ``--resume`` into a store made with different settings.
        NonFiniteTeacherError: NaN or Inf in the teacher's logits, naming the document.
    """
    joined = not is_distributed()
    try:
        return _run_teacher_pass(cfg, teacher)
    finally:
        end_processes(default_group=joined)  # a group the caller made stays theirs


def _run_teacher_pass(cfg: TeacherPassConfig, teacher: Teacher | None) -> dict[str, Any]:
    """:func:`run_teacher_pass`'s work."""
    # ---- setup
    codec = cfg.build_codec()
    temps = cfg.extra_temperatures()
    placement = teacher.placement if teacher else cfg.placement()
    device = teacher.device if teacher else pick_device(cfg.device)
    rank, world = init_processes(device)
    # A tensor-parallel group works as one rank did: it owns shards, its first rank commits them.
    group, groups, group_rank = tensor_parallel_groups(rank, world, placement.tensor_parallel)
    bars = cfg.progress and rank == 0
    # The data before the teacher: a wrong path, split or field fails in seconds, not after
    # minutes of loading a 70B teacher.
    with library_bars(bars):
        source = _rank_0_first(lambda: _load_source(cfg), rank, world, "reading the data")
    # Then the tokens, with the tokenizer alone: bad rows, too, fail before the weights load.
    tokenizer = teacher.tokenizer if teacher else load_tokenizer(
        cfg.teacher, gguf_file=cfg.gguf_file, trust_remote_code=cfg.trust_remote_code,
        revision=cfg.revision,
    )  # fmt: skip
    with library_bars(bars):
        windows = _rank_0_first(
            lambda: _windows(cfg, source, tokenizer), rank, world, "tokenizing the data",
            cached=not cfg.streaming,
        )  # fmt: skip
    with library_bars(bars):  # GGUF dequantising, loading the weights
        teacher = teacher or load_teacher(
            cfg.teacher,
            gguf_file=cfg.gguf_file,
            dtype=cfg.dtype,
            device=None if placement.device_map is not None else str(device),
            trust_remote_code=cfg.trust_remote_code,
            revision=cfg.revision,
            placement=placement,
            tokenizer=tokenizer,
        )
    codec.fields(teacher.vocab_size, len(temps))  # k > V and friends fail here, before any work
    check_context(teacher, windows, cfg.max_length)  # every rank has the same windows
    shards = plan_shards(windows, cfg.docs_per_shard)
    codec, first_batch = _fitted_codec(codec, cfg, teacher, shards, rank, world, group)
    open_args: dict[str, Any] = {
        "codec": codec,
        "backend": cfg.backend,
        "metadata": build_metadata(cfg, teacher, source.metadata),
        "vocab_size": teacher.vocab_size,
        "temperatures": temps,
        "storage_options": cfg.storage_options,
        "compression_level": cfg.compression_level,
    }
    writer: StoreWriter | None = None
    error: BaseException | None = None
    if rank == 0:
        try:
            if cfg.resume and stored_settings(cfg.out, cfg.storage_options) is None:
                # Not refused: a job requeued with the same command line starts with --resume.
                print(
                    f"note: resume: no store at {cfg.out} yet; starting a new one", file=sys.stderr
                )
            writer = StoreWriter(cfg.out, mode="resume" if cfg.resume else "create", **open_args)
        except LogitstoreError as exc:
            error = exc
    agree(error, world, "opening the store")
    if rank != 0:
        try:
            writer = StoreWriter(cfg.out, mode="join", **open_args)
        except StoreNotFoundError:
            error = ConfigError(
                f"rank {rank} does not see the store rank 0 has just opened at {cfg.out}: every "
                "rank writes into one store, so --out must be storage they all share (a shared "
                "filesystem or an object store; memory:// is each process's own, a local disk "
                "each machine's)"
            )
        except LogitstoreError as exc:
            error = exc
    agree(error, world, "joining the store")
    assert writer is not None
    # Only this group's first rank commits this group's shards, and not before a forward that
    # needs every rank of the group: all of them read the same committed set here.
    committed = writer.committed_shards()
    state: dict[str, Any] = {
        "shards": len(shards),
        "committed": sorted(committed),
        "todo": [i for i in range(len(shards)) if i % groups == group and i not in committed],
        "written": [],
        "documents": 0,
        "tokens": 0,
    }

    # ---- loop
    total_docs = sum(len(shards[i]) for i in state["todo"])
    progress = progress_bar(total_docs, show=cfg.progress and rank == 0)
    # The group's other ranks only take part in the forwards.
    worker = Worker(writer, codec, temperatures=temps, seed=cfg.seed) if group_rank == 0 else None
    tp_group = tensor_parallel_group(placement.tensor_parallel)

    start = time.perf_counter()
    try:
        with torch.inference_mode():
            for i in state["todo"]:
                shard = ShardBuffer(
                    i, shards[i], fidelity_positions=cfg.fidelity_positions, seed=cfg.seed
                )
                for batch in plan_batches(shard.windows, cfg.batch_size):
                    windows = [shard.windows[j] for j in batch]
                    if i == 0 and first_batch is not None:  # run once already, to fit on
                        (logits, ids), first_batch = first_batch, None
                    else:
                        logits, ids = forward_batch(teacher.model, windows, teacher.device)
                    _submit(worker, tp_group, teacher.device, shard, windows, logits, ids)
                    if worker is None:
                        continue
                    state["tokens"] += sum(w.num_tokens for w in windows)
                    rate = state["tokens"] / max(time.perf_counter() - start, 1e-9)
                    progress.update(len(windows))
                    progress.set_postfix_str(f"{rate:,.0f} tok/s", refresh=False)
                _submit(worker, tp_group, teacher.device, shard)
                if worker is not None:
                    state["written"].append(i)
                    state["documents"] += len(shard.windows)
        if worker is not None:
            worker.close()
    except BaseException as exc:
        # Shards whose commit was queued are still committed; the failing one never is.
        with contextlib.suppress(BaseException):  # the first error is the one to report
            if worker is not None:
                worker.close()
        with contextlib.suppress(BaseException):
            writer.close()  # a resume may start once this process is gone or has given up
        error = exc
    finally:
        progress.close()
    agree(error, world, "the teacher pass")

    # ---- save
    writer.close()  # before the barrier: finalize removes claims/ with every writer's file in it
    barrier()
    run = {"placement": placement.describe()}  # information, not a setting of the store
    manifest = writer.finalize(len(shards), run) if rank == 0 else None
    barrier()  # nobody reports success before the manifest exists
    return {
        "rank": rank,
        "world_size": world,
        "shards": len(shards),
        "shards_written": state["written"],
        "documents": state["documents"],
        "tokens": state["tokens"],
        "seconds": time.perf_counter() - start,
        "placement": {**placement.describe(), "logits_device": str(teacher.device)},
        "manifest": manifest,
    }


def format_summary(summary: Mapping[str, Any]) -> str:
    """A few human-readable lines from :func:`run_teacher_pass`'s result."""
    lines = [
        f"wrote {len(summary['shards_written'])} of {summary['shards']} shards "
        f"({summary['documents']} documents, {summary['tokens']:,} tokens) in "
        f"{summary['seconds']:.1f} s ({summary['tokens'] / max(summary['seconds'], 1e-9):,.0f} tok/s)"
    ]
    placed = summary.get("placement") or {}
    if placed.get("device_map") is not None or placed.get("tensor_parallel", 1) > 1:
        lines.append(
            f"teacher placement: device map {placed['device_map']}, tensor parallel "
            f"{placed['tensor_parallel']}, logits on {placed['logits_device']}"
        )
    manifest = summary.get("manifest")
    if manifest:
        stats = manifest["statistics"]
        lines.append(
            f"store: {stats['documents']} documents, {stats['tokens']:,} tokens, "
            f"{stats['bytes']:,} bytes, {stats['bytes_per_token']:.1f} bytes/token"
        )
        fid = stats.get("fidelity")
        if fid and fid.get("positions"):
            lines.append(
                f"fidelity on {int(fid['positions'])} positions: mass captured "
                f"{fid['mass_captured']:.4f}, bucket KL {fid['bucket_kl']:.2e}, top-1 agreement "
                f"{fid['top1_agreement']:.4f}"
            )
    return "\n".join(lines)


if (
    __name__ == "__main__"
):  # torchrun -m logitstore.pipelines.teacher_pass ... takes the CLI's options
    import importlib

    # Looked up at run time: the CLI imports this module, so no static import back.
    importlib.import_module("logitstore.cli").main(["teacher-pass", *sys.argv[1:]])
