"""The fused forward of ``logitstore.hf``: the causal LM's forward with the distillation loss.

Fused-loss libraries patch a causal LM's ``forward`` so that the loss is computed from the
final hidden states and the head weight without ``[batch, seq, vocab]`` logits; this module
does the same for the sparse teacher. The loss runs as the output head module's own forward,
so engines that shard the head (FSDP, DeepSpeed ZeRO-3) gather it in their hooks; a head split
by transformers' tensor parallelism is gathered here.

The logits are the student's own: the head's product with the final hidden states, plus the
head's bias (Phi-2, GPT-J), times a family's fixed scale (Cohere, Granite), capped as Gemma 2
caps them. A student whose own forward does more is refused rather than trained on logits it
never gives: a scale of an unknown family, a loss of its own beside the logits' (a mixture of
experts' load balancing), PEFT adapters on the head.
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.tensor import DTensor
from transformers.utils import ModelOutput

from logitstore.divergences import DistillationLoss, MetricTotals, batch_metrics
from logitstore.errors import ConfigError


@dataclass
class KDOutput(ModelOutput):
    """What the patched forward returns: the loss, and the batch's metric sums when asked."""

    loss: torch.Tensor | None = None
    metrics: MetricTotals | None = None


class TeacherBatch:
    """The teacher's side of a batch, handed to the forward in one plain object.

    Not a dict or dataclass on purpose: engines that cast floating inputs of a forward (FSDP's
    mixed precision casts them to bf16) leave it alone, so the teacher's log-probs keep their
    float32 precision.
    """

    def __init__(self, position_mask: torch.Tensor, fields: dict[str, Any], metrics: bool):
        self.position_mask = position_mask
        self.fields = fields
        self.metrics = metrics


def _run_as_forward(module: torch.nn.Module, fn: Any, *args: Any) -> Any:
    """Call ``fn(*args)`` as ``module``'s forward, through ``module.__call__``.

    Engines gather a module's sharded parameters in hooks around its forward and backward
    (DeepSpeed ZeRO-3, FSDP with the head as its own unit), so the head weight is whole inside
    ``fn`` and the gradient it returns is reduced the engine's way.
    """
    module.forward = fn  # type: ignore[method-assign]
    try:
        return module(*args)
    finally:
        del module.forward


def _kd_forward(
    self: Any,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    kd_batch: TeacherBatch | None = None,
    num_items_in_batch: float | torch.Tensor | None = None,
    **kwargs: Any,
) -> Any:
    """The causal LM's forward with the distillation loss (``kd_batch`` given) or as before."""
    if kd_batch is None:
        return self._logitstore_forward(
            input_ids=input_ids, attention_mask=attention_mask, **kwargs
        )
    loss_fn: DistillationLoss = self._logitstore_loss
    out = self.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    hidden = out.last_hidden_state[:, :-1][kd_batch.position_mask]
    head = self.get_output_embeddings()
    refuse_adapted_head(head)
    measured: list[MetricTotals] = []

    vocab = self._logitstore_vocab
    scale, softcap = logits_after_head(self)

    tensor_parallel = int(getattr(self, "_tp_size", None) or 1) > 1

    def whole(t: torch.Tensor) -> torch.Tensor:
        if tensor_parallel and isinstance(t, DTensor):
            # transformers' tensor parallelism splits the head's rows over the ranks: gathered
            # whole (vocab x hidden, as FSDP gathers it), its gradient goes back to the shards.
            t = t.full_tensor()
        # Rows past the teacher's vocabulary (a head padded to a multiple of 64) are no token:
        # the student's softmax is taken over the teacher's ids, as if its head were cut there.
        return t if vocab is None else t[:vocab]

    def head_loss(h: torch.Tensor) -> torch.Tensor:
        bias = getattr(head, "bias", None)
        h, weight = logit_operands(h, whole(head.weight), None if bias is None else whole(bias),
                                   scale)  # fmt: skip
        if kd_batch.metrics:  # the same measurements as evaluation, on this batch
            found = batch_metrics(h.detach(), weight.detach(), kd_batch.fields,
                                  chunk_size=loss_fn.chunk_size, softcap=softcap)  # fmt: skip
            measured.append(MetricTotals(h.device).add(found))
        return loss_fn(h, weight, kd_batch.fields, num_items_in_batch, softcap=softcap)

    # Under tensor parallelism the head's hooks would shard this input and gather the output
    # as logits: the loss is computed beside them, on the gathered weight.
    loss = head_loss(hidden) if tensor_parallel else _run_as_forward(head, head_loss, hidden)
    return KDOutput(loss=loss, metrics=measured[0] if measured else None)


def logit_operands(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hidden', weight')`` whose product ``hidden' @ weight'.T`` is ``scale * (hidden @
    weight.T + bias)``: the logits of a head with a bias and a fixed scale, for the fused loss
    and the metrics, which take a product (with the cap of :func:`logits_after_head`).

    A bias (Phi-2, GPT-J, CodeGen) is one more column of the weight beside a 1 after each
    hidden state, so the bias gets its gradient; the scale multiplies the hidden states.
    """
    if bias is not None:
        weight = torch.cat([weight, bias.to(weight.dtype).unsqueeze(1)], dim=1)
        hidden = torch.cat([hidden, hidden.new_ones(hidden.shape[0], 1)], dim=1)
    return (hidden * scale if scale != 1.0 else hidden), weight


def causal_lm(model: Any) -> Any:
    """The ``transformers`` causal LM inside ``model`` (itself, or the base of a PEFT model)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not hasattr(inner, "get_decoder") or inner.get_output_embeddings() is None:
        raise ConfigError(
            f"{type(inner).__name__} is not a causal LM with a decoder and an output head"
        )
    return inner


# A fixed factor by which a family's forward scales the head's product: (model types, config
# setting, whether the logits are divided by it). The same setting means a product in one
# family and a quotient in another (HyperCLOVA X multiplies by logits_scaling, Granite divides).
_SCALES = (
    (("cohere", "cohere2", "cohere2_moe", "cohere_compass"), "logit_scale", False),
    (("granite", "granite_swa", "granitemoe", "granitemoe_swa", "granitemoeshared",
      "granitemoehybrid", "minicpm3"), "logits_scaling", True),
    (("hyperclovax",), "logits_scaling", False),
    (("falcon_h1",), "lm_head_multiplier", False),
)  # fmt: skip


def logits_after_head(lm: Any) -> tuple[float, float | None]:
    """How ``lm``'s forward turns the head's product into its logits: ``(scale, softcap)``,
    the logits being ``softcap * tanh(scale * product / softcap)`` (no cap: ``softcap`` None).

    The cap is Gemma 2's ``final_logit_softcapping``; the scales are ``_SCALES``' settings.

    Raises:
        ConfigError: a scale setting of a model type whose use of it is not known here.
    """
    config: Any = getattr(lm, "config", None)
    # Read from the config at each forward, or copied from it at load (Cohere's logit_scale).
    holders = [config, config.get_text_config()] if hasattr(config, "get_text_config") else []
    types = {str(getattr(holder, "model_type", "")) for holder in holders}
    scale, softcap = 1.0, None
    for holder in holders:
        cap = getattr(holder, "final_logit_softcapping", None)
        softcap = float(cap) if isinstance(cap, (int, float)) and cap else softcap
    for name in {name for _, name, _ in _SCALES}:
        # The module's own copy first: Cohere's forward reads it, not the config.
        found = [vars(lm).get(name)] + [getattr(h, name, None) for h in holders]
        value = next((v for v in found if isinstance(v, (int, float))), 1.0)
        if value in (0, 1):
            continue
        known = [divide for kinds, key, divide in _SCALES if key == name and types & set(kinds)]
        if not known:
            families = sorted(k for kinds, key, _ in _SCALES if key == name for k in kinds)
            raise ConfigError(
                f"{type(lm).__name__} sets {name}={value}, a scale of its logits that KDTrainer "
                f"applies for the model types {', '.join(families)} only (this one is "
                f"{', '.join(sorted(types - {''}))}): expected {name}=1.0 (load the student "
                f"with from_pretrained(..., {name}=1.0) if its forward does not use it)"
            )
        scale = scale / value if known[0] else scale * value
    return scale, softcap


def refuse_loss_beside_logits(lm: Any) -> None:
    """Refuse a causal LM whose forward adds a loss of its own beside the logits' one: a
    mixture of experts' load-balancing loss (``output_router_logits``), which the fused forward
    would drop without a word."""
    config: Any = getattr(lm, "config", None)
    holders = [config, config.get_text_config()] if hasattr(config, "get_text_config") else []
    if any(getattr(holder, "output_router_logits", False) is True for holder in holders):
        raise ConfigError(
            f"{type(lm).__name__} adds its router's load-balancing loss to its loss "
            "(output_router_logits=True), which the fused distillation forward does not "
            "compute: expected output_router_logits=False (load the student with "
            "from_pretrained(..., output_router_logits=False) to train without it)"
        )


def refuse_adapted_head(head: Any) -> None:
    """Refuse an output head that carries PEFT adapters (LoRA with ``lm_head`` among its target
    modules): the fused loss reads the head's weight, which leaves out their update."""
    tuners = sys.modules.get("peft.tuners.tuners_utils")  # no adapter without peft imported
    if tuners is not None and isinstance(head, tuners.BaseTunerLayer):
        raise ConfigError(
            f"the student's output head carries PEFT adapters ({type(head).__name__}); the "
            "fused loss reads the head's weight without their update, so they would train "
            "nothing and the logits trained would not be the student's: expected a head "
            "without adapters (leave it out of target_modules, or train it whole with "
            "modules_to_save=['lm_head'])"
        )


def patch_for_distillation(
    model: Any, loss: DistillationLoss, vocab_size: int | None = None
) -> Any:
    """Make ``model``'s causal LM compute ``loss`` in its forward when given ``kd_batch``.

    Without ``kd_batch`` the forward is the original one (generation, evaluation). Patching
    twice replaces the loss. ``vocab_size``: the teacher's; the loss then uses the head's first
    ``vocab_size`` rows (the rest pad the head past the vocabulary). Returns ``model``.

    Raises:
        ConfigError: ``model``'s forward scales the head's logits in a way not known here,
            adds a loss of its own (a mixture of experts' load balancing), or its head carries
            PEFT adapters.
    """
    lm = causal_lm(model)
    logits_after_head(lm)
    refuse_loss_beside_logits(lm)
    refuse_adapted_head(lm.get_output_embeddings())
    if "_logitstore_forward" not in vars(lm):
        lm._logitstore_forward = lm.forward
        lm.forward = types.MethodType(_kd_forward, lm)
    lm._logitstore_loss = loss
    lm._logitstore_vocab = vocab_size
    return model
