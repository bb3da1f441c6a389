"""Settings files of the teacher pass and of training: a YAML mapping, read with a one-line
error for a file that is not one.

Numbers are read as YAML 1.2 (and JSON) read them: PyYAML follows YAML 1.1, whose floats need a
dot, so ``1e-4`` or ``5e-1`` would be the strings ``'1e-4'`` and ``'5e-1'``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from logitstore.errors import ConfigError


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads an exponent without a dot (``1e-4``) as a float."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_yaml(text: str) -> Any:
    """``text`` read as YAML, with YAML 1.2's numbers (``1e-4`` is a float).

    Raises:
        yaml.YAMLError: ``text`` is not YAML.
    """
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader)


def read_settings(path: str | Path) -> dict[str, Any]:
    """The mapping of settings in the YAML file ``path`` (an empty file: none).

    Raises:
        ConfigError: the file is not valid YAML, or holds something other than a mapping.
    """
    try:
        data = load_yaml(Path(path).read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings, found {type(data).__name__}")
    return data
