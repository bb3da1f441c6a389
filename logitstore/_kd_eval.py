"""``KDTrainer``'s evaluation: the objective and the teacher-agreement metrics on a held-out store.

Trainer's own evaluation loop batches rows of a map-style dataset and averages a loss per
batch; a store is read as whole documents grouped by a token budget, and the loss is a mean
over tokens. So evaluation reads the held-out store once, in store order, each rank its own
share (``StoreDataset(shuffle=False)``), and sums over tokens and ranks:

* ``loss``: the training objective, a mean over the trained tokens;
* ``teacher_kl`` (KL(teacher || student)), ``teacher_rkl``, ``top1_agreement``,
  ``student_top1_prob``, ``teacher_top1_prob``, ``student_entropy``, ``student_ece``,
  ``teacher_ece``, ``student_accuracy``, ``teacher_accuracy``: the measurements training logs
  (``logitstore.divergences.metrics``), the same numbers ``logitstore eval`` reports;
* ``tokens`` and ``documents`` read.

Engines that shard the student (FSDP, DeepSpeed ZeRO-3) need every rank in each forward, and
ranks' shares of a store differ by up to a shard: a rank that has run out takes part in the
remaining forwards with a batch whose every label is ignored, which adds nothing.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch

from logitstore._kd_forward import TeacherBatch
from logitstore.dataset import IGNORE_INDEX, StoreDataset, collate_documents
from logitstore.divergences import MetricTotals
from logitstore.errors import ConfigError, TokenizerMismatchError
from logitstore.format import tail_temperatures

METRIC_NAMES = {"fkl": "teacher_kl", "rkl": "teacher_rkl"}
"""Summary keys renamed as training logs them."""


def _vocabulary(manifest: Mapping[str, Any]) -> Any:
    """The teacher pass's fingerprint of its vocabulary in ``manifest``, if any."""
    tokenizer = manifest.get("tokenizer")
    return tokenizer.get("vocab_sha256") if isinstance(tokenizer, Mapping) else None


def check_held_out(train: Mapping[str, Any], held_out: Mapping[str, Any], where: str) -> None:
    """Refuse a held-out store (manifest ``held_out``, named ``where``) that the objective built
    for the training store's manifest ``train`` cannot read alike.

    Raises:
        TokenizerMismatchError: the vocabulary sizes differ, or the vocabularies the teacher
            passes fingerprinted (one size, other ids: Llama 2's and Mistral's 32000).
        ConfigError: the extra captured temperatures differ (the objective reads their tail
            columns by position).
    """
    if int(held_out["vocab_size"]) != int(train["vocab_size"]):
        raise TokenizerMismatchError(
            f"the evaluation store {where} has vocabulary size {held_out['vocab_size']}; the "
            f"training store's is {train['vocab_size']}"
        )
    theirs_ids, ours_ids = _vocabulary(held_out), _vocabulary(train)
    if theirs_ids and ours_ids and theirs_ids != ours_ids:
        raise TokenizerMismatchError(
            f"the evaluation store {where} was written with another vocabulary than the "
            f"training store (vocab_sha256 {str(theirs_ids)[:12]}..., the training store's "
            f"{str(ours_ids)[:12]}...): its token ids mean other text"
        )
    theirs, ours = tail_temperatures(held_out) or [], tail_temperatures(train) or []
    if list(theirs) != list(ours):
        raise ConfigError(
            f"the evaluation store {where} captured the temperatures {[1.0, *theirs]}, the "
            f"training store {[1.0, *ours]}: write both with the same temperatures"
        )


def eval_datasets(
    source: Any,
    args: Any,
    tokens_per_batch: int,
    train: Mapping[str, Any],
    storage_options: dict[str, Any] | None,
    counts: bool = False,
) -> StoreDataset | dict[str, StoreDataset]:
    """Held-out stores (a store URL, an opened store or a ``StoreDataset(shuffle=False)``, or a
    dict of them), each read once in store order and split across the run's ranks; with
    ``counts`` (an objective of draw counts, RS-KD) each must hold them.

    Raises:
        ConfigError: a held-out store without draw counts for an objective of them, here
            rather than at the first evaluation, which may come after hours of training.
    """

    def one(held_out: Any) -> StoreDataset:
        data = StoreDataset.for_process(
            held_out,
            int(args.process_index),
            int(args.world_size),
            what="eval_dataset",
            storage_options=storage_options,
            tokens_per_batch=tokens_per_batch,
            shuffle=False,
        )
        if data.shuffle:
            raise ConfigError(
                "an evaluation StoreDataset reads each document once: make it with shuffle=False"
            )
        where = str(getattr(data.store, "url", "given"))
        check_held_out(train, data.store.manifest, where)
        if counts and not data.store.codec.has_counts:
            raise ConfigError(
                f"the evaluation store {where} has no draw counts (codec "
                f"{data.store.codec.name}); the objective uses them (use_counts, RS-KD): "
                "expected a sampled store, as the training store is"
            )
        return data

    if isinstance(source, Mapping):
        if not source:
            raise ConfigError("eval_dataset is an empty dict; name at least one held-out store")
        return {str(name): one(held_out) for name, held_out in source.items()}
    return one(source)


def _ignored(batch: dict[str, Any]) -> dict[str, Any]:
    """``batch`` with every label ignored: a forward that trains and measures nothing."""
    return {**batch, "labels": torch.full_like(batch["labels"], IGNORE_INDEX), "num_tokens": 0}


def evaluate_store(trainer: Any, data: StoreDataset, prefix: str) -> dict[str, float]:
    """Read ``data`` once with ``trainer``'s model; the module docstring's metrics, keyed
    ``{prefix}_{name}``, the same on every rank."""
    from logitstore.hf import TEACHER_FIELDS

    start = time.perf_counter()
    model = trainer._wrap_model(trainer.model, training=False)
    args = trainer.args
    if not trainer.is_in_train and (args.fp16_full_eval or args.bf16_full_eval):
        # As Trainer's evaluation loop does: for a full half-precision evaluation Trainer leaves
        # the student where it was loaded, to be cast and placed here outside training.
        half = torch.float16 if args.fp16_full_eval else torch.bfloat16
        model = model.to(dtype=half, device=args.device)
    if len(trainer.accelerator._models) == 0 and (
        trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled
    ):
        raise ConfigError(
            "evaluate() before train() under FSDP or DeepSpeed: the engine has not wrapped the "
            "student yet; evaluate during training (eval_strategy) or after it"
        )
    device = trainer.args.device
    distributed = trainer.accelerator.num_processes > 1
    was_training = model.training
    model.eval()
    totals = MetricTotals(device)
    loss_sum = 0.0
    documents = 0
    batches = iter(data)
    spare: dict[str, Any] | None = None
    try:
        while True:
            batch = next(batches, None)
            if distributed and batch is not None and spare is None:
                spare = _ignored(batch)
            if distributed:  # every rank in every forward, while any rank has a batch
                if trainer._all_sum([0.0 if batch is None else 1.0])[0] == 0:
                    break
                if batch is None:
                    spare = spare or _ignored(collate_documents([data.store[0]]))
            elif batch is None:
                break
            real = batch is not None
            inputs = trainer._prepare_inputs(batch if real else spare)
            fields = {k: inputs.get(k) for k in TEACHER_FIELDS}
            tokens = int(inputs["num_tokens"])
            with torch.no_grad(), trainer.compute_loss_context_manager():
                out = model(
                    input_ids=inputs["input_ids"],
                    attention_mask=inputs["attention_mask"],
                    kd_batch=TeacherBatch(inputs["position_mask"], fields, True),
                    num_items_in_batch=max(float(tokens), 1.0),
                )
            if real:
                loss_sum += float(out["loss"]) * tokens
                documents += len(inputs["doc_ids"])
                if out.get("metrics") is not None:
                    totals.merge(out["metrics"])
    finally:
        model.train(was_training)
    if distributed:
        totals.values = trainer.accelerator.reduce(totals.values, reduction="sum")
    loss_sum, documents_all = trainer._all_sum([loss_sum, float(documents)])
    summary = totals.summary()
    tokens_all = summary.pop("tokens")
    metrics = {"loss": loss_sum / tokens_all if tokens_all else float("nan")}
    metrics.update({METRIC_NAMES.get(k, k): v for k, v in summary.items()})
    metrics.update(tokens=tokens_all, documents=int(documents_all))
    metrics["runtime"] = round(time.perf_counter() - start, 4)
    return {f"{prefix}_{k}": v for k, v in metrics.items()}
