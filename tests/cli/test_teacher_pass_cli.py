"""``logitstore teacher-pass``: options, YAML config, summary and error exits."""

from __future__ import annotations

import json

import pytest
import yaml
from click.testing import CliRunner

import logitstore
from logitstore.cli import main


def invoke(*args: str):
    return CliRunner().invoke(main, ["teacher-pass", *args])


def test_help_lists_options_and_examples():
    result = invoke("--help")
    assert result.exit_code == 0
    for option in (
        "--teacher",
        "--gguf-file",
        "--messages-field",
        "--resume",
        "--temperatures",
        "--docs-per-shard",
    ):
        assert option in result.output
    assert "Examples:" in result.output and "torchrun" in result.output


def test_run_prints_a_summary_that_matches_the_store(tmp_path, tiny_teacher_dir, text_jsonl):
    out = tmp_path / "store"
    result = invoke(
        "--teacher", str(tiny_teacher_dir), "--data", str(text_jsonl), "--out", str(out),
        "--codec", "topk", "--k", "12", "--values", "q4", "--max-length", "40", "--limit", "2",
        "--docs-per-shard", "9", "--temperatures", "1.0,0.5", "--no-progress",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    store = logitstore.open_store(str(out))
    stats = store.manifest["statistics"]
    assert store.codec.unfit().to_json()["configuration"] == {"k": 12, "values": "q4"}
    assert store.manifest["tail_temperatures"] == [0.5]
    assert f"{stats['documents']} documents" in result.output
    assert f"{stats['bytes_per_token']:.1f} bytes/token" in result.output
    assert "top-1 agreement" in result.output


def test_yaml_config_with_command_line_overrides(tmp_path, tiny_teacher_dir, text_jsonl):
    config = tmp_path / "pass.yaml"
    out = tmp_path / "store"
    config.write_text(yaml.safe_dump({
        "teacher": str(tiny_teacher_dir), "data": str(text_jsonl), "out": str(out),
        "k": 4, "max_length": 24, "limit": 1, "backend": "parquet", "progress": False,
    }))  # fmt: skip
    result = invoke("--config", str(config), "--k", "6")
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["codec"]["configuration"]["k"] == 6  # the command line wins
    assert manifest["capture"]["max_length"] == 24 and manifest["backend"] == "parquet"


@pytest.mark.parametrize("switch", ["resume", "streaming", "trust_remote_code"])
def test_a_config_files_switch_can_be_turned_off_and_on_from_the_command_line(
    switch, tmp_path, monkeypatch
):
    # `resume: true` in a config file could not be switched off: the flags had no --no- form.
    import logitstore.cli.teacher_pass as cli_module

    seen = []
    monkeypatch.setattr(cli_module, "run_teacher_pass", lambda config: seen.append(config))
    monkeypatch.setattr(cli_module, "format_summary", lambda summary: "")
    flag = "--" + switch.replace("_", "-")
    for in_file in (True, False):
        config = tmp_path / "pass.yaml"
        config.write_text(
            yaml.safe_dump({"teacher": "t", "data": "d", "out": "o", switch: in_file})
        )
        for given, expected in ((flag, True), (flag.replace("--", "--no-", 1), False)):
            result = invoke("--config", str(config), given)
            assert result.exit_code == 0, result.output
            assert getattr(seen.pop(), switch) is expected, (in_file, given)
        assert invoke("--config", str(config)).exit_code == 0
        assert getattr(seen.pop(), switch) is in_file


def test_errors_exit_non_zero_with_a_message(tmp_path, tiny_teacher_dir, text_jsonl):
    result = invoke("--teacher", str(tiny_teacher_dir), "--data", str(text_jsonl))
    assert result.exit_code == 2 and "--out" in result.output
    out = tmp_path / "store"
    result = invoke(
        "--teacher",
        str(tiny_teacher_dir),
        "--data",
        str(text_jsonl),
        "--out",
        str(out),
        "--k",
        "1000",
    )
    assert result.exit_code == 2 and "exceeds the vocabulary size 384" in result.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("teacher: x\ndata: y\nout: z\nbatchsize: 3\n")
    result = invoke("--config", str(bad))
    assert result.exit_code == 2 and "batchsize" in result.output and "batch_size" in result.output


def test_a_home_relative_path_in_a_yaml_config_is_expanded(
    tmp_path, tiny_teacher_dir, text_jsonl, monkeypatch
):
    """A YAML file gets no shell: ``~/...`` names the home folder, as on a command line."""
    import shutil

    home = tmp_path / "home"
    shutil.copytree(tiny_teacher_dir, home / "models" / "teacher")
    shutil.copy(text_jsonl, home / "docs.jsonl")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "pass.yaml"
    config.write_text(yaml.safe_dump({
        "teacher": "~/models/teacher", "data": "~/docs.jsonl", "out": "~/store",
        "k": 4, "max_length": 24, "limit": 2, "progress": False,
    }))  # fmt: skip
    result = invoke("--config", str(config))
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "~").exists()
    store = logitstore.open_store(str(home / "store"))
    direct = tmp_path / "direct"  # the same run with the paths written out
    result = invoke("--teacher", str(home / "models" / "teacher"), "--data", str(home / "docs.jsonl"),
                    "--out", str(direct), "--k", "4", "--max-length", "24", "--limit", "2",
                    "--no-progress")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert [d.doc_id for d in store] == [d.doc_id for d in logitstore.open_store(str(direct))]
    assert store.manifest["teacher"] == logitstore.open_store(str(direct)).manifest["teacher"]


def test_resume_says_when_there_is_no_store_to_resume(tmp_path, tiny_teacher_dir, text_jsonl):
    """A mistyped --out with --resume started over without a word (hours of a big teacher)."""
    out = tmp_path / "store"
    args = ("--teacher", str(tiny_teacher_dir), "--data", str(text_jsonl), "--out", str(out),
            "--max-length", "40", "--limit", "2", "--no-progress", "--resume")  # fmt: skip
    first = invoke(*args)
    assert first.exit_code == 0, first.output
    assert f"resume: no store at {out} yet; starting a new one" in first.stderr
    assert logitstore.open_store(str(out)).num_documents > 0
    again = invoke(*args)  # a store there: resumed, with no note
    assert again.exit_code == 0, again.output
    assert "no store" not in again.stderr and "wrote 0 of 1 shards" in again.stdout
