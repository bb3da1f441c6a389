"""Where the teacher's weights live: one device, an accelerate device map, or tensor parallelism.

A :class:`Placement` is run information, never a store setting: the same teacher placed
differently writes the same store (byte for byte with a device map, within float rounding with
tensor parallelism), so a resume may use another placement.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from logitstore.errors import ConfigError

DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
"""accelerate's placement strategies; any other ``--device-map`` value names a JSON file."""


def parse_max_memory(value: str | Mapping[Any, Any] | None) -> dict[int | str, int | str] | None:
    """``"0=20GiB,cpu=60GiB"`` (or a mapping) as accelerate's ``max_memory``: ``{0: "20GiB", ...}``.

    A device that is a number is a GPU index; sizes are accelerate's (``"20GiB"``, ``"500MB"``)
    or plain bytes.
    """
    if value is None:
        return None
    items: list[tuple[Any, Any]]
    if isinstance(value, Mapping):
        items = list(value.items())
    else:
        pairs = [part.split("=", 1) for part in str(value).split(",") if part.strip()]
        if not pairs or any(len(p) != 2 or not p[0].strip() or not p[1].strip() for p in pairs):
            raise ConfigError(
                f"max_memory: expected DEVICE=SIZE pairs separated by commas "
                f"(e.g. 0=20GiB,cpu=60GiB), found {value!r}"
            )
        items = [(k.strip(), v.strip()) for k, v in pairs]
    out: dict[int | str, int | str] = {}
    for key, size in items:
        device: int | str = int(key) if str(key).isdigit() else str(key)
        out[device] = int(size) if str(size).isdigit() else str(size)
    return out


def _read_device_map(name: str) -> dict[str, int | str]:
    path = Path(name)
    if not path.is_file():
        raise ConfigError(
            f"device_map: expected one of {', '.join(DEVICE_MAP_STRATEGIES)} or a JSON file "
            f"mapping module names to devices, found {name!r} (no such file)"
        )
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"device_map file {name}: not valid JSON ({exc})") from None
    if not isinstance(data, dict) or not data:
        raise ConfigError(
            f"device_map file {name}: expected an object of module name to device, "
            f"found {type(data).__name__}"
        )
    return data


@dataclass(frozen=True)
class Placement:
    """Where the teacher's weights live. Run information: never a setting a resume must match.

    Attributes:
        device_map: ``None`` (the whole model on one device), an accelerate strategy
            (:data:`DEVICE_MAP_STRATEGIES`) or an explicit map of module name to device
            (a GPU index, ``"cpu"`` or ``"disk"``).
        max_memory: accelerate's per-device budget for a strategy, e.g. ``{0: "20GiB"}``.
        offload_folder: where ``"disk"`` weights go; a temporary directory when ``None``.
        tensor_parallel: ranks that share one copy of the teacher (1: no tensor parallelism).
    """

    device_map: str | dict[str, int | str] | None = None
    max_memory: dict[int | str, int | str] | None = None
    offload_folder: str | None = None
    tensor_parallel: int = 1
    source: str | None = field(default=None, compare=False)
    """The device-map file's name, for :meth:`describe`."""

    @classmethod
    def resolve(
        cls,
        device_map: str | Mapping[str, int | str] | None = None,
        max_memory: str | Mapping[Any, Any] | None = None,
        offload_folder: str | None = None,
        tensor_parallel: int = 1,
    ) -> Placement:
        """Validate the user's options; a device-map file is read here, once."""
        if isinstance(tensor_parallel, bool) or not isinstance(tensor_parallel, int):
            raise ConfigError(f"tensor_parallel must be an int >= 1, found {tensor_parallel!r}")
        if tensor_parallel < 1:
            raise ConfigError(f"tensor_parallel must be >= 1, found {tensor_parallel}")
        if tensor_parallel > 1 and (device_map is not None or max_memory is not None):
            raise ConfigError(
                "tensor_parallel and device_map/max_memory are exclusive: tensor parallelism "
                "places every rank's share of the weights on that rank's own device"
            )
        if max_memory is not None and device_map is None:
            raise ConfigError("max_memory needs a device_map strategy (e.g. --device-map auto)")
        source = None
        placed: str | dict[str, int | str] | None
        if isinstance(device_map, Mapping):
            placed = dict(device_map)
        elif device_map is None or device_map in DEVICE_MAP_STRATEGIES:
            placed = device_map
        else:
            placed, source = _read_device_map(str(device_map)), Path(device_map).name
        return cls(placed, parse_max_memory(max_memory), offload_folder, tensor_parallel, source)

    def describe(self) -> dict[str, Any]:
        """Plain JSON for summaries: ``{"device_map", "max_memory", "tensor_parallel"}``."""
        dm: Any = self.device_map
        if isinstance(dm, dict):
            dm = {
                "file": self.source,
                "modules": len(dm),
                "devices": sorted(map(str, set(dm.values()))),
            }
        memory = {str(k): v for k, v in self.max_memory.items()} if self.max_memory else None
        return {"device_map": dm, "max_memory": memory, "tensor_parallel": self.tensor_parallel}


# -- loading -------------------------------------------------------------------------------


def load_device_map(
    teacher: str, dtype: torch.dtype, placement: Placement, kwargs: dict[str, Any]
) -> Any:
    """The teacher placed by accelerate: across devices, with CPU and disk offload."""
    from transformers import AutoModelForCausalLM

    # Written to only for "disk" weights that are not in a safetensors checkpoint.
    cleanup = placement.offload_folder is None
    folder = placement.offload_folder or tempfile.mkdtemp(prefix="logitstore-offload-")
    model = AutoModelForCausalLM.from_pretrained(
        teacher,
        dtype=dtype,
        device_map=placement.device_map,
        # a copy: accelerate rewrites the sizes in place, as bytes
        max_memory=dict(placement.max_memory) if placement.max_memory else None,
        offload_folder=folder,
        **kwargs,
    )
    if cleanup:
        weakref.finalize(model, shutil.rmtree, folder, True)
    return model


def output_device(model: Any) -> torch.device:
    """Where a placed model's logits are computed: its output head's execution device.

    accelerate's top-level hook moves the inputs to the first layer's device and the output
    back to the inputs' device, so inputs placed here make the logits come out where the head
    computed them, with no copy of the ``(B, T, V)`` logits.
    """
    head = model.get_output_embeddings()
    names = {id(m): n for n, m in model.named_modules()}
    path = names.get(id(head), "")
    modules = dict(model.named_modules())
    for depth in range(path.count(".") + 1, -1, -1):  # the head, then its parents
        module = modules.get(".".join(path.split(".")[:depth]) if depth else "")
        hook = getattr(module, "_hf_hook", None)
        where = getattr(hook, "execution_device", None)
        if where is not None:
            return torch.device(where)
    return head.weight.device  # one device: no hooks were attached


def check_heads(config: Any, size: int) -> None:
    """Refuse a tensor-parallel size that does not divide the attention heads, before loading.

    Each rank computes whole heads: the query, key and value projections are split by heads,
    so ``size`` must divide both head counts (transformers does not check, and the first
    forward failed deep inside the attention, after every weight was loaded).
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    counts = {
        label: value
        for label, value in (
            ("attention heads", getattr(text, "num_attention_heads", None)),
            ("key-value heads", getattr(text, "num_key_value_heads", None)),
        )
        if isinstance(value, int) and not isinstance(value, bool) and value > 0
    }
    uneven = {label: n for label, n in counts.items() if n % size}
    if uneven:
        common = math.gcd(*counts.values())
        fits = [str(n) for n in range(2, common + 1) if common % n == 0]
        said = " and ".join(f"{n} {label.removesuffix('s') if n == 1 else label}"
                            for label, n in uneven.items())  # fmt: skip
        instead = f"--tensor-parallel {' or '.join(fits)}, or " if fits else ""
        raise ConfigError(
            f"--tensor-parallel {size}: the teacher has {said}, which {size} ranks cannot split "
            f"evenly (each rank computes whole heads); use {instead}--device-map"
        )


def load_tensor_parallel(
    teacher: str,
    config: Any,
    dtype: torch.dtype,
    device: torch.device,
    placement: Placement,
    kwargs: dict[str, Any],
) -> Any:
    """The teacher sharded by transformers' tensor parallelism over this rank's group.

    Groups are runs of ``tensor_parallel`` consecutive ranks (the usual launch puts them on one
    node). ``from_pretrained(distributed_config=...)`` builds its mesh over the whole world, one
    group only; the mesh it gets here has a data-parallel dimension in front, so each group
    loads and runs its own copy and groups never wait on each other.
    """
    import torch.distributed as dist
    from torch.distributed import init_device_mesh
    from transformers.distributed import DistributedConfig
    from transformers.distributed.utils import TransformersDeviceMesh
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    size = placement.tensor_parallel
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ConfigError(
            f"model type {getattr(config, 'model_type', '?')!r} is not built into transformers; "
            f"--tensor-parallel needs one of its own causal LMs"
        )
    if not getattr(config, "base_model_tp_plan", None):
        raise ConfigError(
            f"model type {getattr(config, 'model_type', '?')!r} has no tensor-parallel plan in "
            f"transformers (its config's base_model_tp_plan is empty), so --tensor-parallel "
            f"{size} cannot shard it; use --device-map, or one replica per device"
        )
    check_heads(config, size)
    if not dist.is_initialized() or dist.get_world_size() % size:
        found = dist.get_world_size() if dist.is_initialized() else 1
        raise ConfigError(
            f"--tensor-parallel {size} needs torchrun with a multiple of {size} processes, "
            f"found {found}"
        )
    groups = dist.get_world_size() // size
    dense = init_device_mesh(
        device.type, (1, groups, 1, size), mesh_dim_names=("pp", "dp_replicate", "fsdp", "tp")
    )
    expert = init_device_mesh(
        device.type, (1, groups, size, 1), mesh_dim_names=("pp", "dp_replicate", "efsdp", "ep")
    )
    mesh = TransformersDeviceMesh(dense, expert)
    mapped: Any = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]  # the class from_pretrained would pick
    classes = mapped if isinstance(mapped, tuple) else (mapped,)
    named = [c for c in classes if c.__name__ in (getattr(config, "architectures", None) or [])]
    base = (named or list(classes))[0]

    # from_pretrained takes its mesh from this classmethod (which would span the whole world):
    # the one place to hand it the group's mesh instead.
    class GroupMesh(base):  # type: ignore[misc, valid-type]
        @classmethod
        def prepare_distribute_model(
            cls, distributed_config: Any, device_map: Any = None
        ) -> tuple[Any, Any, Any]:
            return distributed_config, device, mesh

    GroupMesh.__name__ = GroupMesh.__qualname__ = base.__name__
    return GroupMesh.from_pretrained(
        teacher, dtype=dtype, distributed_config=DistributedConfig(tp_size=size), **kwargs
    )
