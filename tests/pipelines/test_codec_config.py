"""The teacher pass's codec setting: one nested ``{"name", **params}`` from the CLI and YAML to
the codec, defaults only in the codec classes, short options mapped onto the codec's parameters
and refused where the codec has no such parameter, choices from the registries."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from click.testing import CliRunner

from logitstore.cli import main as cli_main
from logitstore.cli.teacher_pass import command as teacher_pass_command
from logitstore.codecs import CODECS, VALUE_OPTIONS, Dense, Sampled, TopK, get_codec
from logitstore.errors import ConfigError, UnknownNameError
from logitstore.pipelines.teacher_pass import TeacherPassConfig, run_teacher_pass
from logitstore.storage import BACKENDS

PATHS = {"teacher": "t", "data": "d", "out": "o"}


def cfg(**kw) -> TeacherPassConfig:
    return TeacherPassConfig(**PATHS, **kw)


def test_the_default_codec_is_the_codec_classes_default():
    config = cfg()
    assert config.codec == {"name": "topk"}
    assert config.build_codec() == TopK() == get_codec("topk")
    assert (TopK().k, TopK().values, Sampled().n, Dense().bits) == (128, "q6", 50, 8)


@pytest.mark.parametrize(
    ("given", "nested", "codec"),
    [
        ({"codec": "sampled", "draws": 20}, {"name": "sampled", "n": 20}, Sampled(n=20)),
        ({"codec": "dense", "bits": 4}, {"name": "dense", "bits": 4}, Dense(bits=4)),
        ({"k": 64, "values": "q8"}, {"name": "topk", "k": 64, "values": "q8"}, TopK(64, "q8")),
        ({"codec": {"name": "topk", "k": 32}}, {"name": "topk", "k": 32}, TopK(k=32)),
        ({"codec": {"name": "topk", "k": 32}, "k": 16}, {"name": "topk", "k": 16}, TopK(k=16)),
        ({"codec": {"name": "sampled", "n": 9}}, {"name": "sampled", "n": 9}, Sampled(n=9)),
    ],
)
def test_short_settings_become_the_nested_codec_passed_as_is(given, nested, codec):
    config = cfg(**given)
    assert config.codec == nested
    assert config.build_codec() == codec
    assert "k" not in {f.name for f in dataclasses.fields(config)}  # not flattened any more


@pytest.mark.parametrize(
    ("given", "words"),
    [
        ({"codec": "sampled", "k": 64}, "k applies to codec topk, not to 'sampled'"),
        ({"codec": "sampled", "values": "q4"}, "values applies to codec topk"),
        ({"codec": "topk", "draws": 10}, "draws applies to codec sampled, not to 'topk'"),
        ({"codec": "topk", "bits": 4}, "bits applies to codec dense"),
        ({"codec": {"name": "dense"}, "k": 3}, "(whose parameters are bits)"),
        ({"codec": {"k": 3}}, "codec must be a codec name (topk, sampled, dense) or a mapping"),
        ({"codec": 7}, "codec must be a codec name"),
    ],
)
def test_a_setting_the_codec_does_not_have_is_refused(given, words):
    with pytest.raises(ConfigError) as info:
        cfg(**given)
    assert words in str(info.value)


def test_unknown_codecs_and_parameters_name_what_is_known():
    with pytest.raises(UnknownNameError, match="unknown codec 'zip'; known: dense, sampled, topk"):
        cfg(codec="zip")
    with pytest.raises(ConfigError, match=r"no parameters \['kk'\]; known: \['hot_ids', 'k'"):
        cfg(codec={"name": "topk", "kk": 3}).build_codec()
    with pytest.raises(ConfigError, match="values must be one of"):
        cfg(values="q5").build_codec()
    with pytest.raises(ConfigError, match="bits must be 8 or 4"):
        cfg(codec="dense", bits=5).build_codec()
    for draws in (0, -3):  # the codec calls it n: the message says which option that is
        with pytest.raises(
            ConfigError, match=rf"n must be a positive integer, found {draws} \(--draws sets n\)"
        ):
            cfg(codec="sampled", draws=draws).build_codec()


def test_yaml_takes_the_nested_form_and_the_old_flat_keys(tmp_path):
    nested = tmp_path / "nested.yaml"
    nested.write_text("teacher: t\ndata: d\nout: o\ncodec:\n  name: topk\n  k: 64\n  values: q8\n")
    flat = tmp_path / "flat.yaml"
    flat.write_text("teacher: t\ndata: d\nout: o\ncodec: sampled\ndraws: 20\n")
    assert TeacherPassConfig.from_yaml(nested).codec == {"name": "topk", "k": 64, "values": "q8"}
    assert TeacherPassConfig.from_yaml(flat).codec == {"name": "sampled", "n": 20}
    # Command-line options override the file: a short option sets one parameter, the same
    # codec name keeps the file's parameters, another codec replaces them.
    assert TeacherPassConfig.from_yaml(nested, values="q4").codec["values"] == "q4"
    assert TeacherPassConfig.from_yaml(nested, codec="topk").codec["k"] == 64
    assert TeacherPassConfig.from_yaml(nested, codec="dense").codec == {"name": "dense"}
    with pytest.raises(ConfigError, match="unknown teacher-pass settings"):
        TeacherPassConfig.from_dict({**PATHS, "n": 3})


def test_cli_choices_come_from_the_registries():
    params = {p.name: p for p in teacher_pass_command.params}
    assert list(params["codec"].type.choices) == list(CODECS)
    assert list(params["backend"].type.choices) == list(BACKENDS)
    assert list(params["values"].type.choices) == list(VALUE_OPTIONS)
    assert "[default: 128]" in params["k"].help and "[default: q6]" in params["values"].help
    for name in ("convert", "mix"):
        backend = next(p for p in cli_main.commands[name].params if p.name == "backend")
        assert list(backend.type.choices) == list(BACKENDS)


def test_cli_refuses_an_option_the_codec_does_not_have(tmp_path):
    result = CliRunner().invoke(
        cli_main,
        ["teacher-pass", "--teacher", "t", "--data", "d", "--out", str(tmp_path / "o"),
         "--codec", "sampled", "--k", "64"],
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "k applies to codec topk, not to 'sampled'" in result.output
    assert not (tmp_path / "o").exists()


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_default_stores_are_byte_identical_to_explicit_settings(
    tmp_path, tiny_teacher_dir, text_jsonl
):
    """The defaults moved from the pass's config into the codec classes: a store written with
    no codec settings equals one written with the old defaults spelt out, flat or nested."""
    common = {"teacher": str(tiny_teacher_dir), "data": str(text_jsonl), "limit": 3,
              "max_length": 48, "docs_per_shard": 8, "progress": False}  # fmt: skip
    forms = {
        "default": {},
        "flat": {"codec": "topk", "k": 128, "values": "q6"},
        "nested": {"codec": {"name": "topk", "k": 128, "values": "q6"}},
    }
    trees = {}
    for name, form in forms.items():
        run_teacher_pass(TeacherPassConfig(out=str(tmp_path / name), **common, **form))
        trees[name] = _tree(tmp_path / name)
    assert trees["default"] == trees["flat"] == trees["nested"]
    assert '"values": "q6"' in trees["default"]["manifest.json"].decode()
