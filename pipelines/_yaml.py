"""Settings files of the teacher pass and of training: a YAML mapping, read with a one-line
error for a file that is not one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from logitstore.errors import ConfigError


def read_settings(path: str | Path) -> dict[str, Any]:
    """The mapping of settings in the YAML file ``path`` (an empty file: none).

    Raises:
        ConfigError: the file is not valid YAML, or holds something other than a mapping.
    """
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings, found {type(data).__name__}")
    return data
