"""The teacher pass's settings: one dataclass, loadable from YAML, overridable from the CLI."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import InitVar, dataclass
from pathlib import Path
from typing import Any

from logitstore.codecs import Codec, get_codec
from logitstore.errors import ConfigError
from logitstore.pipelines._codec import CODEC_OPTIONS, nested_codec
from logitstore.pipelines._placement import Placement
from logitstore.pipelines._yaml import read_settings

# Integer settings and their least value, checked when the settings are made (a YAML file can
# give any type; a negative count would fail deep inside the pass, after the teacher loaded).
_INT_SETTINGS = {"max_length": 2, "batch_size": 1, "docs_per_shard": 1, "fidelity_positions": 0,
                 "tensor_parallel": 1, "seed": 0}  # fmt: skip


@dataclass
class TeacherPassConfig:
    """Every setting of the teacher pass; loadable from YAML, overridable from the CLI.

    Settings that change the stored values (codec, max_length, windowing, temperatures, seed,
    docs_per_shard, compression_level, data fields, dtype) are recorded in the store; a resumed
    run must match them; so are the data source's ``split``, ``subset`` and ``data_revision``.
    ``batch_size``, ``device``, the placement (``device_map``, ``max_memory``,
    ``offload_folder``, ``tensor_parallel``), ``streaming``, ``num_proc``, ``cache_dir`` (the
    ``datasets`` cache of the loaded rows and their windows) and ``progress`` are not recorded.
    ``device_map`` is an accelerate strategy (``auto``, ``balanced``, ``balanced_low_0``,
    ``sequential``), a JSON file of module name to device, or a mapping; ``max_memory`` is
    ``"0=20GiB,cpu=60GiB"`` or a mapping.

    ``codec`` is the codec's name and parameters as the codec takes them, e.g.
    ``{"name": "topk", "k": 128, "values": "q6"}``; parameters left out take the codec class's
    defaults. A bare name (``"sampled"``) is that codec with its defaults. ``k``, ``values``,
    ``draws`` and ``bits`` are accepted as short settings (see :data:`CODEC_OPTIONS`) and merged
    into ``codec``; one the chosen codec does not have is refused.
    """

    teacher: str
    data: str
    out: str
    gguf_file: str | None = None
    revision: str | None = None
    dtype: str | None = None
    device: str | None = None
    device_map: str | dict[str, int | str] | None = None
    max_memory: str | dict[Any, Any] | None = None
    offload_folder: str | None = None
    tensor_parallel: int = 1
    trust_remote_code: bool = False
    split: str = "train"
    subset: str | None = None
    data_revision: str | None = None
    streaming: bool = False
    num_proc: int | None = None
    cache_dir: str | None = None
    text_field: str = "text"
    messages_field: str | None = None
    limit: int | None = None
    codec: dict[str, Any] | str = "topk"  # always the nested dict after __init__
    k: InitVar[int | None] = None
    values: InitVar[str | None] = None
    draws: InitVar[int | None] = None
    bits: InitVar[int | None] = None
    backend: str = "zarr"
    max_length: int = 2048
    windowing: bool = True
    batch_size: int = 8
    temperatures: Sequence[float] = (1.0,)
    seed: int = 0
    docs_per_shard: int = 256
    compression_level: int = 9
    fidelity_positions: int = 256
    resume: bool = False
    storage_options: dict[str, Any] | None = None
    progress: bool = True

    def __post_init__(
        self, k: int | None, values: str | None, draws: int | None, bits: int | None
    ) -> None:
        for name, low in _INT_SETTINGS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{name} must be an integer >= {low}, found {value!r}")
        for name in ("limit", "num_proc"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ConfigError(f"{name} must be an integer, found {value!r}")
        # "~" as a shell would expand it: a YAML file or a quoted option gets no shell (out is
        # expanded by fsspec; a Hub id never starts with "~").
        for name in ("teacher", "data", "cache_dir", "offload_folder", "device_map"):
            value = getattr(self, name)
            if isinstance(value, str) and value.startswith("~"):
                setattr(self, name, os.path.expanduser(value))
        short = {"k": k, "values": values, "draws": draws, "bits": bits}
        self.codec = nested_codec(self.codec, {o: v for o, v in short.items() if v is not None})

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TeacherPassConfig:
        """Build from a mapping; unknown keys raise ``ConfigError`` listing the known ones."""
        known = {f.name for f in dataclasses.fields(cls)} | set(CODEC_OPTIONS)
        unknown = set(data) - known
        if unknown:
            raise ConfigError(
                f"unknown teacher-pass settings {sorted(unknown)}; known: {sorted(known)}"
            )
        missing = [key for key in ("teacher", "data", "out") if data.get(key) is None]
        if missing:
            raise ConfigError(f"teacher-pass settings {missing} are required, found none")
        return cls(**data)

    def placement(self) -> Placement:
        """The teacher's placement, validated (a device-map file is read here)."""
        if self.device_map is not None and self.device:
            raise ConfigError(
                f"device ({self.device}) and device_map ({self.device_map}) are exclusive: "
                "a device map places the teacher across devices itself"
            )
        if self.device_map is not None and int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
            raise ConfigError(
                f"device_map spreads one process's teacher over every device of its machine, "
                f"found {os.environ['LOCAL_WORLD_SIZE']} processes on this one; run one per "
                "machine (torchrun --nproc-per-node 1) or use --tensor-parallel"
            )
        return Placement.resolve(
            self.device_map, self.max_memory, self.offload_folder, self.tensor_parallel
        )

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> TeacherPassConfig:
        """Load a YAML mapping of settings, then apply ``overrides`` (e.g. from the CLI)."""
        data = read_settings(path)
        codec = data.get("codec")
        if isinstance(codec, Mapping) and overrides.get("codec") == codec.get("name"):
            overrides = {k: v for k, v in overrides.items() if k != "codec"}  # keep its params
        return cls.from_dict({**data, **overrides})

    def build_codec(self) -> Codec:
        """The codec ``codec`` describes, validated by the codec class."""
        params = dict(nested_codec(self.codec, {}))
        name = params.pop("name")
        try:
            return get_codec(name, **params)
        except ConfigError as exc:
            # The codec names its own parameters; say which option sets one named otherwise
            # (--draws is sampled's n), so "n must be ..." names what the user typed.
            aliases = [
                f"--{o} sets {p}" for o, p in CODEC_OPTIONS.items() if o != p and p in params
            ]
            if not aliases:
                raise
            raise ConfigError(f"codec {name}: {exc} ({'; '.join(aliases)})") from None

    def extra_temperatures(self) -> list[float]:
        """Temperatures besides 1 whose tail log-sum-exp is stored, in column order."""
        given = self.temperatures
        if isinstance(given, (int, float)) and not isinstance(given, bool):
            given = [given]
        elif isinstance(given, str):  # "1.0,2.0", as on the command line
            given = [t for t in given.split(",") if t.strip()]
        try:
            temps = [float(t) for t in given]
        except (TypeError, ValueError):
            raise ConfigError(
                f"temperatures must be a list of positive numbers, e.g. [1.0, 2.0]; found {given!r}"
            ) from None
        if any(not t > 0 for t in temps):
            raise ConfigError(f"temperatures must be positive, found {temps}")
        return [t for t in dict.fromkeys(temps) if t != 1.0]
