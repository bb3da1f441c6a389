"""The student: loading, initialisation, the tokenizer check, and its loss on a batch.

A student is named by a Hub id, a local model directory, or a model config file (JSON or
YAML, with ``model_type``; random initialisation). It can then take weights from a teacher of
the same architecture: embeddings, final norm and head, plus a chosen subset of the teacher's
layers (student layer ``i`` <- teacher layer ``keep_layers[i]``).

Training and evaluation run the model's body to its final hidden states
(:func:`final_hidden`) and hand them, with the LM head weight, to the fused loss or metrics:
full ``[batch, seq, vocab]`` logits are never formed. Models whose head applies more than a
plain matrix (a bias, logit soft-capping or scaling) are not handled exactly by this path.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from logitstore._tokenizer import check_tokenizer
from logitstore.errors import ConfigError, TokenizerMismatchError
from logitstore.pipelines._models import (
    EXPECTED_STUDENT,
    EXPECTED_TOKENIZER,
    check_model_location,
    loading,
)

_LAYER = re.compile(r"\.layers\.(\d+)\.")


def is_config_file(spec: str) -> bool:
    return Path(spec).is_file() and Path(spec).suffix in {".json", ".yaml", ".yml"}


def gguf_location(spec: str) -> tuple[str, dict[str, str]]:
    """``(folder, {"gguf_file": name})`` for a path to a ``.gguf`` file (as the teacher pass's
    ``--teacher`` takes one), else ``(spec, {})``: ``from_pretrained`` loads a GGUF file by
    its folder and name."""
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return str(path.parent), {"gguf_file": path.name}
    return spec, {}


def load_student(spec: str, *, seed: int = 0, dtype: str = "auto") -> Any:
    """A causal LM from a Hub id, a model directory, or a config file (random init, ``seed``).

    ``dtype``: ``"auto"`` keeps the checkpoint's own dtype (float32 for a config file), or a
    torch dtype name such as ``"float32"``.
    """
    if dtype != "auto" and not isinstance(getattr(torch, dtype, None), torch.dtype):
        raise ConfigError(f"student dtype must be 'auto' or a torch dtype name; found {dtype!r}")
    weights = torch.float32 if dtype == "auto" else getattr(torch, dtype)
    from transformers import AutoConfig, AutoModelForCausalLM

    if is_config_file(spec):
        import yaml

        from logitstore.pipelines._yaml import load_yaml

        text = Path(spec).read_text()
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            try:
                data = load_yaml(text)
            except yaml.YAMLError as exc:
                message = " ".join(str(exc).split())
                raise ConfigError(
                    f"student config {spec} is neither JSON nor YAML: {message}"
                ) from None
        if not isinstance(data, dict) or "model_type" not in data:
            raise ConfigError(f"student config {spec} must be a mapping with 'model_type'")
        data = dict(data)
        with loading("student config", spec):
            config = AutoConfig.for_model(data.pop("model_type"), **data)
            torch.manual_seed(seed)
            return AutoModelForCausalLM.from_config(config, dtype=weights)
    check_model_location(spec, "student", expected=EXPECTED_STUDENT)
    with loading("student", spec):
        return AutoModelForCausalLM.from_pretrained(
            spec, dtype=dtype if dtype == "auto" else weights
        )


def load_tokenizer(spec: str | None) -> Any:
    """The tokenizer at ``spec`` (Hub id or directory), or None when there is none to load."""
    if spec is None or is_config_file(spec):
        return None
    from transformers import AutoTokenizer

    folder, gguf = gguf_location(spec)
    if not gguf:
        check_model_location(spec, "tokenizer", tokenizer=True, expected=EXPECTED_TOKENIZER)
    with loading("tokenizer", spec):
        return AutoTokenizer.from_pretrained(folder, **gguf)


def init_from_teacher(student: torch.nn.Module, teacher: str, keep_layers: Sequence[int]) -> None:
    """Copy the teacher's non-layer weights and layers ``keep_layers`` into ``student``.

    Args:
        student: a model of the teacher's architecture with ``len(keep_layers)`` layers.
        teacher: Hub id or directory of the teacher, or a path to its ``.gguf`` file
            (dequantised by ``transformers``, as the teacher pass loads it).
        keep_layers: teacher layer indices; student layer ``i`` takes ``keep_layers[i]``.

    Raises:
        ConfigError: different architectures, layer counts or tensor shapes.
    """
    from transformers import AutoModelForCausalLM

    folder, gguf = gguf_location(teacher)
    if not gguf:
        check_model_location(teacher, "teacher to initialise from")
    with loading("teacher to initialise from", teacher):
        source = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **gguf)
    if type(source) is not type(student):
        raise ConfigError(
            f"init from teacher needs one architecture; teacher is {type(source).__name__}, "
            f"student {type(student).__name__}"
        )
    layers = student.config.num_hidden_layers
    if len(keep_layers) != layers or not all(
        0 <= j < source.config.num_hidden_layers for j in keep_layers
    ):
        raise ConfigError(
            f"keep_layers must name {layers} teacher layers in "
            f"[0, {source.config.num_hidden_layers}); found {list(keep_layers)}"
        )
    rename = {str(j): str(i) for i, j in enumerate(keep_layers)}
    target = student.state_dict()
    picked = {}
    for name, tensor in source.state_dict().items():
        match = _LAYER.search(name)
        if match:
            if match.group(1) not in rename:
                continue
            name = f"{name[: match.start(1)]}{rename[match.group(1)]}{name[match.end(1) :]}"
        if name not in target or target[name].shape != tensor.shape:
            found = None if name not in target else tuple(target[name].shape)
            raise ConfigError(
                f"teacher weight {name} {tuple(tensor.shape)} has no match in the student "
                f"(found {found})"
            )
        picked[name] = tensor
    missing = set(target) - set(picked)
    if missing:
        raise ConfigError(f"student weights not covered by the teacher: {sorted(missing)[:5]}")
    student.load_state_dict(picked)


def head_size(model: Any) -> int:
    """Rows of the LM head: the size of the student's softmax."""
    return int(model.get_output_embeddings().weight.shape[0])


def check_vocabulary(manifest: Mapping[str, Any], model: Any, tokenizer: Any | None) -> list[str]:
    """Refuse a student whose vocabulary or tokenizer differs from the teacher's.

    Args:
        manifest: the store's manifest (``vocab_size`` and ``tokenizer``).
        model: the student; its head must have at least the store's vocabulary size (more
            rows: a padded embedding matrix).
        tokenizer: the student's tokenizer, or None (then only the size is checked).

    Returns:
        Notes on what could not be checked.

    Raises:
        TokenizerMismatchError: with the teacher's and the student's values.
    """
    vocab = int(manifest["vocab_size"])
    # Rows past the teacher's vocabulary pad the head (to a multiple of 64, say): they are no
    # token, and the loss and the metrics use the first ``vocab`` rows. Fewer rows cannot hold
    # the teacher's ids.
    if head_size(model) < vocab:
        raise TokenizerMismatchError(
            f"the store's teacher has vocabulary size {vocab}; the student's head has "
            f"{head_size(model)} rows: expected at least {vocab}"
        )
    if tokenizer is None:
        return ["no student tokenizer given: only the vocabulary size was checked"]
    return check_tokenizer(manifest, tokenizer)


# ---- the student's final hidden states (never full logits) ----


def final_hidden(lm: Any, batch: dict[str, Any]) -> torch.Tensor:
    """Final hidden states at the real positions, ``(N, H)``, row-major over ``position_mask``.

    Position ``t`` predicts token ``t + 1``, so the last position of each row is dropped.
    """
    body = getattr(lm, lm.base_model_prefix)
    out = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return out.last_hidden_state[:, :-1][batch["position_mask"]]
