"""``pipelines`` exports its public names lazily, each the object its module defines."""

from __future__ import annotations

import importlib

import pytest

import logitstore.pipelines as pipelines


def test_public_names_resolve_to_their_modules_objects():
    assert pipelines.__all__
    for name in pipelines.__all__:
        module = importlib.import_module(pipelines._PUBLIC[name])
        assert getattr(pipelines, name) is getattr(module, name)


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        pipelines.nope  # noqa: B018
