"""One student of the quality experiment: its setting (:class:`Arm`), its training and held-out
evaluation (:func:`run_student`), step 0 (:func:`initial_point`) and the workers that train
several at once (:func:`run_all_students`). ``benchmarks/quality.py`` re-exports these names.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import signal
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch


@dataclasses.dataclass(frozen=True)
class Arm:
    """One student setting: the training store, the objective and its parameters."""

    store: str  # dense, topk, sampled or droptail
    divergence: str
    params: dict[str, float] = dataclasses.field(default_factory=dict)
    use_counts: bool = False  # RS-KD: FKL against the sampled store's draw counts
    diversity: bool = False  # sample generations (the objective comparisons)


#: What a cached student was trained with, beyond its folder's name (store settings, arm and
#: seed): a rerun in the same work folder with any of these changed refuses to reuse it.
TRAINING_SETTINGS = ("keep", "steps", "eval_every", "tokens_per_step", "lr")


def run_student(job: dict[str, Any]) -> dict[str, Any]:
    """Train one arm with one seed and evaluate each checkpoint on the held-out store.

    ``job`` holds plain values (it crosses a process boundary). The result is cached in the run
    folder (``heldout.json``): a rerun of the experiment skips finished students. Intermediate
    checkpoints are deleted once evaluated, and the optimizer state of the last one.
    """
    from logitstore.pipelines.evaluate import evaluate
    from logitstore.pipelines.train import TrainConfig, train

    torch.set_num_threads(job["threads"])
    run_dir = Path(job["run_dir"])
    done = run_dir / "heldout.json"
    settings = {key: job[key] for key in TRAINING_SETTINGS}
    if done.exists():
        cached = json.loads(done.read_text())
        if cached.get("settings", settings) != settings:  # (results written before: kept)
            changed = sorted(k for k in settings if cached["settings"].get(k) != settings[k])
            raise RuntimeError(
                f"{run_dir} holds a student trained with other settings ({', '.join(changed)}); "
                "use another --out, or delete that folder to train it again"
            )
        if Arm(**job["arm"]).diversity and "train_gap" not in cached["final"]:
            training_text(job, cached)  # a student trained before these metrics existed
            done.write_text(json.dumps(cached, indent=1, default=float))
        return cached
    arm = Arm(**job["arm"])
    start = time.perf_counter()
    cfg = TrainConfig(
        store=job["store"], student=job["student"], tokenizer=job["teacher_dir"],
        init_from=job["teacher_dir"], keep_layers=job["keep"], out=str(run_dir),
        divergence=arm.divergence, params=dict(arm.params), use_counts=arm.use_counts,
        max_steps=job["steps"], tokens_per_step=job["tokens_per_step"],
        tokens_per_batch=job["tokens_per_step"], lr=job["lr"],
        warmup_steps=max(1, job["steps"] // 10), seed=job["seed"], save_every=job["eval_every"],
        keep_checkpoints=0, resume=True, device=job["device"], progress=False,
        # Training-batch metrics only at the evaluated steps: on a dense store (the whole
        # vocabulary as the support) they cost as much as the loss, and the held-out
        # evaluation is what is reported. The trained weights are the same either way.
        log_every=job["eval_every"],
    )  # fmt: skip
    summary = train(cfg)
    train_s = time.perf_counter() - start
    checkpoints = sorted(
        (run_dir / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1])
    )
    points = []
    for i, path in enumerate(checkpoints):
        last = i == len(checkpoints) - 1
        metrics = evaluate(
            str(path), job["heldout"], device=job["device"],
            prompts=job["prompts"] if last and arm.diversity else None, seed=job["seed"],
        )  # fmt: skip
        points.append({"step": int(path.name.split("-")[1]), **metrics, "gap": gap(metrics)})
        if not last:
            shutil.rmtree(path)
    for name in ("optimizer.pt", "scheduler.pt"):
        (checkpoints[-1] / name).unlink(missing_ok=True)
    result = {
        "store": arm.store,
        "divergence": arm.divergence,
        "params": dict(arm.params),
        "curve": points,
        "final": points[-1],
        "tokens": summary["tokens"],
        "train_s": train_s,
        "total_s": time.perf_counter() - start,
        "settings": settings,
    }
    if arm.diversity:
        training_text(job, result)
    done.write_text(json.dumps(result, indent=1, default=float))
    return result


def gap(metrics: dict[str, Any]) -> float:
    """The over-confidence gap: student mean top-1 probability minus the teacher's."""
    return float(metrics["student_top1_prob"] - metrics["teacher_top1_prob"])


def training_text(job: dict[str, Any], result: dict[str, Any]) -> None:
    """Add the final checkpoint's teacher KL, gap and ECE on the arm's own training text
    (``train_fkl``, ``train_gap``, ``train_ece``) to ``result``'s final point: over-confidence
    where the student has learnt to match the teacher, beside the held-out figures. Measured
    against the teacher as captured (``job["train_text"]``: for the tail-dropped store, the
    top-k store it was derived from), as the held-out figures are."""
    from logitstore.pipelines.evaluate import evaluate

    step = result["final"]["step"]
    metrics = evaluate(
        str(Path(job["run_dir"]) / "checkpoints" / f"checkpoint-{step}"),
        job.get("train_text", job["store"]), device=job["device"],
    )  # fmt: skip
    extra = {
        "train_fkl": metrics["fkl"],
        "train_gap": gap(metrics),
        "train_ece": metrics["student_ece"],
    }
    result["final"].update(extra)
    if result["curve"] and result["curve"][-1]["step"] == step:
        result["curve"][-1].update(extra)


def initial_point(out: Path, student: Path, teacher_dir: Path, keep: list[int],
                  heldout: str, device: str) -> dict[str, Any]:  # fmt: skip
    """Step 0 of every arm and seed: the student as initialised, evaluated on the held-out store.

    Every weight of the student is copied from the teacher (its embeddings, head and layers
    ``keep``; ``init_from_teacher`` refuses to leave one uncovered), so no seed enters and one
    evaluation serves every arm. Cached in the work folder (whose student architecture is fixed).
    """
    from logitstore.pipelines._student import init_from_teacher, load_student, load_tokenizer
    from logitstore.pipelines.evaluate import evaluate

    done = out / f"initial_{len(keep)}layers.json"
    if done.exists():
        return json.loads(done.read_text())
    folder = out / "student_initial"
    lm = load_student(str(student), seed=0)
    init_from_teacher(lm, str(teacher_dir), keep)
    lm.save_pretrained(folder)
    load_tokenizer(str(teacher_dir)).save_pretrained(folder)
    metrics = evaluate(str(folder), heldout, device=device)
    shutil.rmtree(folder)
    point = {"step": 0, **metrics, "gap": gap(metrics)}
    done.write_text(json.dumps(point, default=float))
    return point


def run_all_students(
    jobs: list[dict[str, Any]], workers: int, stamp: Any, train: Any = None
) -> list[dict[str, Any] | Exception]:
    """Each job's result, or its exception (one failure leaves the others' rows).

    ``train`` (default :func:`run_student`) runs one job. With several workers, an interrupt or
    SIGTERM (see :func:`stop_on_sigterm`) stops the workers too: a student trains for minutes,
    and a worker left running would go on writing into the work folder, beside the students a
    rerun trains there.
    """
    train = train or run_student
    if workers <= 1:
        out: list[dict[str, Any] | Exception] = []
        for job in jobs:
            try:
                out.append(train(job))
            except Exception as exc:  # noqa: BLE001 - reported in the tables
                out.append(exc)
            stamp(f"{job['name']} seed {job['seed']}: " + _line(out[-1]))
        return out
    pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"))
    try:
        futures = [pool.submit(train, job) for job in jobs]
        results: list[dict[str, Any] | Exception] = []
        for job, future in zip(jobs, futures):
            try:
                results.append(future.result())
            except Exception as exc:  # noqa: BLE001 - reported in the tables
                results.append(exc)
            stamp(f"{job['name']} seed {job['seed']}: " + _line(results[-1]))
        return results
    except BaseException:
        for process in list((pool._processes or {}).values()):
            process.terminate()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def stop_on_sigterm() -> None:
    """Turn SIGTERM into ``SystemExit`` in the main thread, so that ``kill`` unwinds like an
    interrupt (and :func:`run_all_students` stops its workers)."""

    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def _line(result: dict[str, Any] | Exception) -> str:
    if isinstance(result, Exception):
        return f"FAILED {type(result).__name__}: {result}"
    final = result["final"]
    return f"held-out teacher KL {final['fkl']:.4f}, gap {final['gap']:+.4f}"
