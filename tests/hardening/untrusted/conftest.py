"""The hostile-store tests' own fixture: a fresh store per test, on each backend (the
hardening conftest's ``store`` is another, written once per module by the teacher pass)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.hardening._hostile import BACKENDS, build


@pytest.fixture(params=BACKENDS)
def store(request, tmp_path) -> Path:
    return build(tmp_path / "store", request.param)
