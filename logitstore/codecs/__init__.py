"""Codecs: how one position's teacher distribution becomes stored arrays, and back.

Select a codec by name (:func:`get_codec`) or from its manifest entry (:func:`codec_from_json`);
``CODECS`` is the registry. :mod:`logitstore.codecs.fidelity` measures a decoded position against
the dense teacher.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from logitstore.codecs._quant import VALUE_OPTIONS
from logitstore.codecs.base import Codec, FieldSpec, Positions
from logitstore.codecs.dense import Dense
from logitstore.codecs.fidelity import (
    fidelity_sums,
    merge_fidelity,
    position_fidelity,
    summarize_fidelity,
)
from logitstore.codecs.sampled import Sampled
from logitstore.codecs.topk import TopK
from logitstore.errors import ConfigError, ManifestError, shown
from logitstore.registry import Registry

CODECS: Registry[type[Codec]] = Registry(
    "codec",
    {
        "topk": TopK,
        "sampled": Sampled,
        "dense": Dense,
    },
)


def get_codec(name: str, **params: Any) -> Codec:
    """The codec ``name`` with ``params``; unknown names or parameters raise with what is known."""
    cls = CODECS[name]
    known = {f for f in cls.__dataclass_fields__}
    unknown = set(params) - known
    if unknown:
        raise ConfigError(
            f"codec {name!r} has no parameters {shown(sorted(unknown), 120)}; known: {sorted(known)}"
        )
    return cls(**params)


def codec_from_json(data: Mapping[str, Any]) -> Codec:
    """The codec a manifest's ``{"name", "version", "configuration"}`` entry describes."""
    if not isinstance(data, Mapping) or "name" not in data:
        raise ManifestError(f"expected a codec entry with a 'name', found {shown(data)}")
    return CODECS[data["name"]].from_json(data)


__all__ = [
    "CODECS",
    "Codec",
    "Dense",
    "FieldSpec",
    "Positions",
    "Sampled",
    "TopK",
    "VALUE_OPTIONS",
    "codec_from_json",
    "fidelity_sums",
    "get_codec",
    "merge_fidelity",
    "position_fidelity",
    "summarize_fidelity",
]
