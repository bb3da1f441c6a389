"""Loading the teacher (Hub id, local directory or GGUF file) and fingerprinting it.

The metadata returned here goes into the store's settings, which a resumed run must match byte
for byte, so it holds nothing machine-specific: a local directory is named by its base name and
identified by a hash of its weight files, a Hub model by its id and commit. Where the weights
live (one device, an accelerate device map, tensor-parallel ranks) is a :class:`Placement`:
run information, never a setting.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from logitstore._tokenizer import tokenizer_fingerprint as tokenizer_fingerprint
from logitstore.codecs import Codec
from logitstore.errors import ConfigError, NonFiniteTeacherError
from logitstore.pipelines._distributed import parse_device
from logitstore.pipelines._models import check_model_location, loading
from logitstore.pipelines._placement import (
    Placement,
    load_device_map,
    load_tensor_parallel,
    output_device,
)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
_FULL_HASH_LIMIT = 4 << 30
"""Weights up to this many bytes are hashed in full; above it, names, sizes and headers only."""


@dataclass
class Teacher:
    """A loaded teacher in inference mode.

    Attributes:
        model: the causal LM, in eval mode on ``device``.
        tokenizer: its tokenizer.
        vocab_size: true vocabulary size, the model's output dimension.
        device: where the inputs go and the logits come out (with a device map: the output
            head's execution device; accelerate moves the inputs to the first layer).
        dtype: the model's parameter dtype.
        metadata: the store's ``teacher`` section.
        placement: where the weights live (run information, not in ``metadata``).
    """

    model: Any
    tokenizer: Any
    vocab_size: int
    device: torch.device
    dtype: torch.dtype
    metadata: dict[str, Any]
    placement: Placement = field(default_factory=Placement)


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """``dtype`` by name or, when ``None``, bfloat16 on CUDA and float32 elsewhere."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; known: {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def weights_fingerprint(directory: Path, gguf_file: str | None = None) -> dict[str, Any]:
    """SHA-256 over a local model's weight files (names and contents, in sorted order).

    Teachers above 4 GiB are fingerprinted by names, sizes and the first MiB of each file,
    which holds the safetensors/GGUF header with every tensor's name, shape and offset; the
    result says which kind it is.
    """
    if gguf_file is not None:
        files = [directory / gguf_file]
    else:
        files = sorted(p for p in directory.iterdir() if p.suffix in _WEIGHT_SUFFIXES)
    total = sum(f.stat().st_size for f in files)
    full = total <= _FULL_HASH_LIMIT
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}\0{f.stat().st_size}\0".encode())
        with f.open("rb") as fh:
            if full:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
            else:
                h.update(fh.read(1 << 20))
    return {"sha256": h.hexdigest(), "kind": "full" if full else "names-sizes-headers"}


def hub_commit(
    repo_id: str, filename: str, revision: str | None = None, cache_dir: str | Path | None = None
) -> str | None:
    """The commit a Hub model was loaded at, read from the local Hub cache (no network).

    ``from_pretrained`` resolves a branch or tag to a commit and caches files under
    ``snapshots/<commit>/``; the path of the cached ``filename`` names it.
    """
    from huggingface_hub import try_to_load_from_cache

    path = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir, revision=revision)
    if not isinstance(path, str):
        return None
    parts = Path(path).parts
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts else None


def _located(teacher: str, gguf_file: str | None) -> tuple[str, Path, str | None, str]:
    """``(teacher, path, gguf_file, name)``: a ``.gguf`` path split into its folder and file,
    checked to hold a model, and the name to say in errors."""
    path = Path(teacher)
    if path.is_file() and path.suffix.lower() == ".gguf":
        if gguf_file is not None and gguf_file != path.name:
            raise ConfigError(f"--teacher names {path.name} but --gguf-file is {gguf_file}")
        path, gguf_file = path.parent, path.name
        teacher = str(path)
    check_model_location(teacher, "teacher", gguf_file=gguf_file)
    named = str(path / gguf_file) if gguf_file is not None and path.is_dir() else teacher
    return teacher, path, gguf_file, named


def _hub_kwargs(gguf_file: str | None, trust_remote_code: bool, revision: str | None) -> dict:
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code, "revision": revision}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    return kwargs


def load_tokenizer(
    teacher: str,
    *,
    gguf_file: str | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
) -> Any:
    """The teacher's tokenizer alone (seconds), named as for :func:`load_teacher`: the data can
    be tokenized, and its errors found, before the weights load (minutes for a 70B teacher)."""
    from transformers import AutoTokenizer

    teacher, _, gguf_file, named = _located(teacher, gguf_file)
    with loading("teacher", named):
        kwargs = _hub_kwargs(gguf_file, trust_remote_code, revision)
        return AutoTokenizer.from_pretrained(teacher, **kwargs)


def load_teacher(
    teacher: str,
    *,
    gguf_file: str | None = None,
    dtype: str | None = None,
    device: str | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
    placement: Placement | None = None,
    tokenizer: Any = None,
) -> Teacher:
    """Load a teacher the way users name it: Hub id, local directory, or GGUF file.

    Args:
        teacher: Hub id, local directory, or a path to a ``.gguf`` file (then ``gguf_file``
            is its name and the directory is its parent).
        gguf_file: GGUF file name inside ``teacher`` (dequantised by ``transformers``).
        dtype: ``float32``, ``bfloat16`` or ``float16``; default bf16 on CUDA, else float32.
        device: torch device; default CUDA when available. With a device map or tensor
            parallelism, the device of this rank (or ``None``).
        trust_remote_code: allow the model's own code to run (off by default).
        revision: Hub revision (branch, tag or commit).
        placement: a device map or tensor parallelism; by default the whole model on
            ``device``. Tensor parallelism needs the process group to be initialised.
        tokenizer: the teacher's tokenizer, already loaded by :func:`load_tokenizer`.

    Raises:
        ConfigError: an unknown dtype, ``--gguf-file`` naming another file than
            ``--teacher``, or tensor parallelism for a model type without a plan for it
            (raised before any weight is loaded).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    placement = placement or Placement()
    teacher, path, gguf_file, named = _located(teacher, gguf_file)
    dev = parse_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    kwargs = _hub_kwargs(gguf_file, trust_remote_code, revision)
    with loading("teacher", named):
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(teacher, **kwargs)
        model: Any
        if placement.tensor_parallel > 1:
            config = AutoConfig.from_pretrained(teacher, **kwargs)
            model = load_tensor_parallel(teacher, config, torch_dtype, dev, placement, kwargs)
        elif placement.device_map is not None:
            model = load_device_map(teacher, torch_dtype, placement, kwargs)
            dev = output_device(model)
        else:
            # Straight onto the device: without a device map, transformers builds the model in
            # host memory first (a 30B teacher: 60 GB of RAM per rank), then .to() copies it.
            model = AutoModelForCausalLM.from_pretrained(
                teacher, dtype=torch_dtype, device_map=dev, **kwargs
            )
    model.eval()
    vocab_size = int(model.get_output_embeddings().weight.shape[0])  # global shape, also TP
    metadata: dict[str, Any] = {
        "dtype": str(torch_dtype).removeprefix("torch."),
        "gguf_file": gguf_file,
        "trust_remote_code": bool(trust_remote_code),
        "model_type": str(getattr(model.config, "model_type", "")),
    }
    if path.is_dir():
        metadata.update(id=path.name, revision=None, weights=weights_fingerprint(path, gguf_file))
    else:
        commit = hub_commit(teacher, gguf_file or "config.json", revision)
        metadata.update(id=teacher, revision=commit or revision, weights=None)
    return Teacher(model, tokenizer, vocab_size, dev, torch_dtype, metadata, placement)


def context_length(model: Any) -> int | None:
    """The most positions the teacher was made for (its config's), or None when it names none."""
    config = model.config
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def check_context(teacher: Teacher, windows: Sequence[Any], max_length: int) -> None:
    """Refuse windows the teacher cannot run, before any forward.

    Past its positions a model with learned positions fails with an index error (on CUDA, a
    device-side assert) and a rotary one returns logits it was never trained to give. A token
    id past its vocabulary (a tokenizer with tokens added that the teacher's embedding lacks)
    fails in the embedding the same way.

    Raises:
        ConfigError: naming the longest window, the teacher's limit and the ``--max-length``
            that fits; or the first window with a token id past the vocabulary.
    """
    limit = context_length(teacher.model)
    longest = max((int(w.input_ids.shape[0]) for w in windows), default=0)
    if limit is not None and longest > limit:
        raise ConfigError(
            f"max_length={max_length} gives windows of up to {longest} tokens, more than the "
            f"teacher's {limit} positions; pass --max-length {limit} or less"
        )
    vocab, tokenizer = teacher.vocab_size, teacher.tokenizer
    if max(tokenizer.get_vocab().values(), default=-1) < vocab:
        return  # no id this tokenizer gives lies past the vocabulary: no pass over the tokens
    for w in windows:
        top = int(w.input_ids.max())  # every window has two tokens or more
        if top >= vocab:
            raise ConfigError(
                f"document {w.doc_id!r} has token id {top} "
                f"({tokenizer.convert_ids_to_tokens(top)!r}), outside the teacher's vocabulary "
                f"of {vocab}; the tokenizer has {len(tokenizer)} tokens, so it does not match "
                "the teacher (tokens added without resizing the model's embeddings?)"
            )


@contextlib.contextmanager
def memory_hint(windows: Sequence[Any]) -> Iterator[None]:
    """Turn running out of device memory on a batch into a one-line :class:`ConfigError` that
    says which settings shrink the batch (a traceback from deep in the model said none)."""
    try:
        yield
    except torch.OutOfMemoryError as exc:
        longest = max(int(w.input_ids.shape[0]) for w in windows)
        said = str(exc).strip().split("\n")[0]
        raise ConfigError(
            f"out of device memory on a batch of {len(windows)} windows of up to {longest} "
            f"tokens ({said}); expected it to fit: lower --batch-size or --max-length (--resume "
            "keeps the shards committed so far), or spread the teacher with --device-map or "
            "--tensor-parallel"
        ) from exc


def forward_batch(
    model: Any, windows: Sequence[Any], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run one padded batch of windows and check that the logits are finite.

    Every window is its own sequence, right-padded, with an attention mask, so no token
    attends across windows. Call under ``torch.inference_mode()``.

    Args:
        model: the causal LM.
        windows: objects with ``doc_id`` and ``input_ids`` int64 ``(T,)``, ``T >= 2``.
        device: where the model lives.

    Returns:
        ``(logits, ids)``: ``(B, T_max, V)`` in the model's dtype and int64 ``(B, T_max)``,
        on ``device``.

    Raises:
        NonFiniteTeacherError: NaN or Inf in the logits of a window, named by its doc id.
    """
    lengths = [int(w.input_ids.shape[0]) for w in windows]
    ids = torch.zeros(len(windows), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, w in enumerate(windows):
        ids[b, : lengths[b]] = torch.tensor(w.input_ids)  # a copy: windows are read-only views
        mask[b, : lengths[b]] = 1
    ids, mask = ids.to(device), mask.to(device)
    # No KV cache: one forward per window, and a 70B teacher's cache is gigabytes per batch.
    with memory_hint(windows):
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    # One host sync per batch: the positions that predict a real next token must be finite.
    # NaN and Inf survive a float32 sum over the vocabulary (finite logits cannot overflow it),
    # which costs one read of the logits instead of a (B, T, V) boolean tensor.
    valid = torch.zeros_like(mask, dtype=torch.bool)
    valid[:, :-1] = mask[:, 1:].bool()
    finite = torch.isfinite(logits.sum(dim=-1, dtype=torch.float32))
    bad = (~finite & valid).any(dim=1).tolist()
    if any(bad):
        names = [w.doc_id for w, b in zip(windows, bad) if b]
        raise NonFiniteTeacherError(
            f"teacher logits contain NaN or Inf for document {names[0]!r}"
            f"{f' (and {len(names) - 1} more in its batch)' if len(names) > 1 else ''}; "
            "expected finite logits. Nothing of this shard was written."
        )
    return logits, ids


def window_logits(
    logits: torch.Tensor, ids: torch.Tensor, windows: Sequence[Any]
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Each window's logits as float32, one window at a time (one float32 copy alive at most).

    The codecs normalise the rows themselves (one pass gives the log-softmax, entropy and
    tail), so no log-softmax is computed here.

    Args:
        logits: ``(B, T_max, V)`` from :func:`forward_batch`.
        ids: int64 ``(B, T_max)`` from :func:`forward_batch`.
        windows: the batch's ``B`` windows.

    Yields:
        ``(b, logits, labels)``: batch row, float32 ``(T - 1, V)`` (a view when the model runs
        in float32) and int64 ``(T - 1,)``.
    """
    for b, w in enumerate(windows):
        t = int(w.input_ids.shape[0])
        yield b, logits[b, : t - 1].float(), ids[b, 1:t]


def fit_codec(
    codec: Any,
    teacher: Teacher,
    sample: Sequence[Any],
    *,
    resume_from: dict[str, Any] | None = None,
) -> tuple[Any, tuple[torch.Tensor, torch.Tensor] | None]:
    """The codec adapted to this teacher (e.g. top-k's storage order of ids) on ``sample``.

    Args:
        codec: the codec the user asked for.
        teacher: the loaded teacher.
        sample: windows to fit on (the first batch of the first shard: fixed by the data and
            the settings, so a rerun fits the same codec).
        resume_from: the settings of the store being resumed, if any. Its fitted codec is
            reused when the user's request matches it, so a resume on other hardware (where
            near-ties in the teacher's top-k could fall the other way) cannot change it.

    Returns:
        ``(codec, forwarded)``: ``forwarded`` is ``forward_batch``'s output for ``sample`` when
        fitting ran it (the teacher pass stores that batch from it instead of running it
        again), else ``None`` (a resumed codec, or one with nothing to learn).

    Raises:
        SettingsMismatchError: ``resume_from`` was made with another codec request.
    """
    from logitstore import format as fmt
    from logitstore.codecs import codec_from_json
    from logitstore.errors import SettingsMismatchError

    if resume_from is not None:
        previous = codec_from_json(resume_from["codec"])
        diff = fmt.first_difference(previous.unfit().to_json(), codec.to_json())
        if diff is None:
            return previous, None
        key, old, new = diff
        raise SettingsMismatchError(
            f"the store was created with different settings: codec {key} is {old!r} in the "
            f"store but {new!r} in this run"
        )
    if type(codec).fit is Codec.fit:  # nothing to learn: no forward
        return codec, None
    with torch.inference_mode():
        logits, ids = forwarded = forward_batch(teacher.model, sample, teacher.device)
        # One copy of the positions, in the model's dtype: ranking them needs no float32 (a
        # float32 copy of each window, then of them all, was four times the batch's bf16 logits).
        with memory_hint(sample):
            rows = torch.cat([logits[b, : w.num_tokens - 1] for b, w in enumerate(sample)])
            return codec.fit(rows), forwarded
