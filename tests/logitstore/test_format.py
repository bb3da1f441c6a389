"""Manifest functions: canonical JSON, path safety, settings comparison, validation."""

from __future__ import annotations

import json
import re

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
        temperatures=[2.0],
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
    with pytest.raises(
        ManifestError, match=rf"manifest.json is missing the field {field!r}"
    ) as info:
        fmt.validate_manifest(m)
    assert not isinstance(info.value, FormatVersionError)  # missing is not "unknown version"


@pytest.mark.parametrize("field", sorted(fmt.SHARD_FIELDS))
def test_every_shard_field_is_checked(field):
    m = _manifest()
    m["shards"][1].pop(field)
    with pytest.raises(ManifestError, match=rf"field shards\[1\] is missing the field {field!r}"):
        fmt.validate_manifest(m)


def test_wrong_types_and_versions_are_refused():
    m = _manifest()
    m["vocab_size"] = "10"
    with pytest.raises(
        ManifestError, match='field vocab_size: expected an integer >= 1.*found "10"'
    ):
        fmt.validate_manifest(m)
    m = _manifest()
    m["format_version"] = 3
    with pytest.raises(FormatVersionError, match="format version 3; this reader supports 1, 2"):
        fmt.validate_manifest(m)
    m = _manifest()
    m["shards"][0]["tokens"] = True
    with pytest.raises(ManifestError, match="shards\\[0\\].tokens: expected an integer >= 1"):
        fmt.validate_manifest(m)
    m = _manifest()
    m["shards"][0]["positions"] = True
    with pytest.raises(ManifestError, match="shards\\[0\\].positions: expected a non-negative"):
        fmt.validate_manifest(m)


# (where in the manifest, a malformed value): wrong types, out of range, overflowing numpy,
# non-finite; each must be refused with a ManifestError that names the field.
MALFORMED = [
    ("vocab_size", 0),
    ("vocab_size", 2**70),
    ("vocab_size", 1.5),
    ("num_temperatures", -1),
    ("num_temperatures", 10**6),
    ("num_temperatures", None),
    ("backend", 7),
    ("codec", []),
    ("codec.name", ["topk"]),
    ("codec.version", "1"),
    ("codec.configuration", [4]),
    ("capture", "x"),
    ("tail_temperatures", 2.0),
    ("tail_temperatures", [0.0]),
    ("tail_temperatures", ["2"]),
    ("teacher", None),
    ("shards", {}),
    ("shards[1]", "x"),
    ("shards[1].documents", -1),
    ("shards[1].tokens", 2**64),
    ("shards[1].tokens", "x"),
    ("shards[1].positions", 8.0),
    ("shards[1].bytes", None),
    ("shards[1].sha256", "abc"),
    ("shards[1].sha256", 0),
    ("shards[1].files", "x"),
    ("shards[1].files[0]", ["a"]),
    ("shards[1].files[0][1]", -5),
    ("shards[1].files[0][1]", "100"),
    ("shards[1].files[0][0]", 3),
    ("shards[1].index", -1),
    ("shards[1].fidelity", [1]),
    ("shards[1].fidelity.count", "512"),
    ("statistics.documents", 1e3),
    ("statistics.bytes_per_token", "2.5"),
    ("statistics.fidelity", 1),
    ("statistics.fidelity.bucket_kl", None),
    ("statistics.fidelity.top1_agreement", [0.9]),
    ("compression_level", 99),
]


def _set(data: dict, where: str, value) -> None:
    keys = [int(k) if k.isdigit() else k for k in re.findall(r"[^.\[\]]+", where)]
    for key in keys[:-1]:
        if isinstance(data, dict) and key not in data:
            data[key] = {}
        data = data[key]
    data[keys[-1]] = value


@pytest.mark.parametrize(("where", "value"), MALFORMED, ids=[f"{w}={v!r}" for w, v in MALFORMED])
def test_malformed_fields_are_refused_naming_the_field(where, value):
    m = _manifest()
    _set(m, where, value)
    with pytest.raises(ManifestError) as info:
        fmt.validate_manifest(json.loads(json.dumps(m)))
    assert f"manifest.json field {where}" in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("text", ["NaN", "Infinity", "-Infinity", "1e999", "-1e400"])
def test_non_finite_numbers_are_refused_anywhere(text):
    raw = b'{"teacher": {"note": [1, ' + text.encode() + b"]}}"
    with pytest.raises(ManifestError, match="not valid JSON"):
        fmt.loads(raw, "manifest.json")


def test_temperatures_must_match_their_number():
    m = _manifest()
    m["tail_temperatures"] = [2.0, 3.0]
    with pytest.raises(ManifestError, match="tail_temperatures: expected num_temperatures = 1"):
        fmt.validate_manifest(m)


def test_declared_sizes_are_bounded_by_the_bytes_on_disk():
    m = _manifest()  # shard 1: 200 bytes on disk, 11 tokens, 9 positions
    fmt.check_declared_sizes(m["shards"], 100, 2)
    m["shards"][1]["tokens"] = 10**6 + 2
    m["shards"][1]["positions"] = 10**6
    with pytest.raises(ManifestError, match=r"shards\[1\].positions: expected at most 256 times"):
        fmt.check_declared_sizes(m["shards"], 100, 2)
