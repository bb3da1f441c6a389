"""The teacher pass's codec setting: one nested ``{"name", **params}``, CLI and YAML to codec.

The nested setting goes to the codec's constructor as it is; the short settings (``--k``,
``--values``, ``--draws``, ``--bits``) are mapped onto the parameters they stand for.
Defaults live in the codec classes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from logitstore.codecs import CODECS
from logitstore.errors import ConfigError

CODEC_OPTIONS = {"k": "k", "values": "values", "draws": "n", "bits": "bits"}
"""Short settings for codec parameters (``--k``, ``--values``, ``--draws``, ``--bits``, and the
flat YAML keys of earlier configs), each mapped to the parameter it sets. Which codecs have
that parameter, and its default, is the codec class's business."""


def _parameters(cls: Any) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def nested_codec(codec: Any, short: Mapping[str, Any]) -> dict[str, Any]:
    """``codec`` (a name, or ``{"name", **params}``) as a dict, with the short settings
    ``short`` (:data:`CODEC_OPTIONS` to value) set as the parameters they stand for.

    Raises:
        ConfigError: ``codec`` is neither, or a short setting the codec has no parameter for.
        UnknownNameError: an unknown codec name (listing the known ones).
    """
    if isinstance(codec, str):
        codec = {"name": codec}
    if not isinstance(codec, Mapping) or not isinstance(codec.get("name"), str):
        raise ConfigError(
            f"codec must be a codec name ({', '.join(CODECS)}) or a mapping of its 'name' and "
            f"parameters, e.g. {{'name': 'topk', 'k': 128}}; found {codec!r}"
        )
    params = _parameters(CODECS[codec["name"]])
    nested = dict(codec)
    for option, value in short.items():
        param = CODEC_OPTIONS[option]
        if param not in params:
            owners = [n for n, c in CODECS.items() if param in _parameters(c)]
            raise ConfigError(
                f"{option} applies to codec {' and '.join(owners)}, not to {codec['name']!r} "
                f"(whose parameters are {', '.join(sorted(params))})"
            )
        nested[param] = value
    return nested
