"""Manifest functions: canonical JSON, path safety, settings comparison, validation."""

from __future__ import annotations

import json

import pytest

from logitstore import format as fmt
from logitstore.errors import ConfigError, FormatVersionError, ManifestError, UnsafePathError


@pytest.mark.parametrize(
    "path",
    [
        "../x",
        "/abs",
        "a/../../b",
        "a/./b",
        "a//b",
        "",
        "s3://bucket/k",
        "hf://datasets/x",
        "C:/x",
        "a\\b",
        "~/x",
        "a\x00b",
        7,
        None,
    ],
)
def test_unsafe_paths_are_refused(path):
    with pytest.raises(UnsafePathError):
        fmt.check_relative_path(path)


@pytest.mark.parametrize("path", ["shards/000001.zarr", "shards/000001.zarr/c/0/0", "a.b-c_d"])
def test_plain_relative_paths_pass(path):
    assert fmt.check_relative_path(path) == path


def test_dumps_is_canonical_and_strict():
    a = fmt.dumps({"b": 1, "a": [1.5, (2, 3)]})
    b = fmt.dumps({"a": [1.5, [2, 3]], "b": 1})
    assert a == b and json.loads(a) == {"a": [1.5, [2, 3]], "b": 1}
    with pytest.raises(ConfigError):
        fmt.dumps({"x": float("nan")})
    with pytest.raises(ConfigError):
        fmt.dumps({"x": object()})


def test_loads_refuses_non_objects_and_nan():
    with pytest.raises(ManifestError, match="JSON object"):
        fmt.loads(b"[1, 2]", "m.json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        fmt.loads(b'{"a": NaN}', "m.json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        fmt.loads(b"\xff\xfe", "m.json")


def test_first_difference_names_the_key_path():
    a = {"teacher": {"model": "x", "opts": [1, 2]}, "k": 1}
    assert fmt.first_difference(a, json.loads(json.dumps(a))) is None
    b = {"teacher": {"model": "x", "opts": [1, 3]}, "k": 1}
    assert fmt.first_difference(a, b) == ("teacher.opts[1]", 2, 3)
    assert fmt.first_difference(a, {"teacher": a["teacher"]}) == ("k", 1, "<missing>")
    assert fmt.first_difference({"k": 1}, {"k": 1.0}) == ("k", 1, 1.0)


def _manifest() -> dict:
    settings = fmt.build_settings(
        codec_json={"name": "topk", "version": 1, "configuration": {"k": 4}},
        backend="zarr",
        vocab_size=10,
        metadata={k: {} for k in fmt.METADATA_KEYS},
    )
    records = [
        {
            "index": i,
            "path": f"shards/{i:06d}.zarr",
            "documents": 2,
            "tokens": 10 + i,
            "positions": 8 + i,
            "bytes": 100 * (i + 1),
            "sha256": "0" * 64,
            "files": [[f"shards/{i:06d}.zarr/zarr.json", 100 * (i + 1)]],
        }
        for i in range(3)
    ]
    return fmt.build_manifest(settings, records, 1, None)


def test_build_manifest_totals():
    m = _manifest()
    fmt.validate_manifest(m)
    s = m["statistics"]
    assert (s["documents"], s["tokens"], s["bytes"]) == (6, 33, 600)
    assert s["bytes_per_token"] == pytest.approx(600 / 33)
    assert [x["path"] for x in m["shards"]] == [f"shards/{i:06d}.zarr" for i in range(3)]


@pytest.mark.parametrize("field", sorted(fmt.MANIFEST_FIELDS))
def test_every_required_field_is_checked(field):
    m = _manifest()
    m.pop(field)
    with pytest.raises(ManifestError, match=repr(field)) as info:
        fmt.validate_manifest(m)
    assert not isinstance(info.value, FormatVersionError)  # missing is not "unknown version"


@pytest.mark.parametrize("field", sorted(fmt.SHARD_FIELDS))
def test_every_shard_field_is_checked(field):
    m = _manifest()
    m["shards"][1].pop(field)
    with pytest.raises(ManifestError, match=rf"shards\[1\].*{field!r}"):
        fmt.validate_manifest(m)


def test_wrong_types_and_versions_are_refused():
    m = _manifest()
    m["vocab_size"] = "10"
    with pytest.raises(ManifestError, match="vocab_size.*int"):
        fmt.validate_manifest(m)
    m = _manifest()
    m["format_version"] = 2
    with pytest.raises(FormatVersionError, match="format version 2; this reader supports 1"):
        fmt.validate_manifest(m)
    m = _manifest()
    m["shards"][0]["tokens"] = True
    with pytest.raises(ManifestError, match="tokens"):
        fmt.validate_manifest(m)
