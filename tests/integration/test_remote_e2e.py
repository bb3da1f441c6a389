"""End to end against a real S3-compatible server (moto, server mode) on 127.0.0.1.

The CLIs get plain ``s3://`` URLs and nothing else: the endpoint and credentials come from the
environment, as a user would set them (``FSSPEC_S3_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``).
"""

from __future__ import annotations

import json
import math

import fsspec
import fsspec.config
import pytest
from click.testing import CliRunner

from logitstore import open_store
from logitstore.cli import main
from logitstore.pipelines.evaluate import evaluate

pytestmark = pytest.mark.integration

BUCKET = "e2e-logits"


@pytest.fixture(scope="module")
def s3_server():
    moto_server = pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """The environment a user sets for an S3-compatible server; returns a client filesystem."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("FSSPEC_S3_ENDPOINT_URL", s3_server)
    # fsspec reads FSSPEC_* variables when it is imported; re-read them as a fresh process would.
    conf: dict = {}
    fsspec.config.set_conf_env(conf)
    monkeypatch.setattr(fsspec.config, "conf", conf)
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    if not fs.exists(BUCKET):
        fs.mkdir(BUCKET)
    return fs


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def test_teacher_pass_verify_inspect_train_on_s3(
    s3_env, s3_server, monkeypatch, tiny_teacher_dir, tiny_student_dir, text_jsonl, tmp_path
):
    url = f"s3://{BUCKET}/store"
    pass_args = (
        "teacher-pass", "--teacher", str(tiny_teacher_dir), "--data", str(text_jsonl),
        "--out", url, "--codec", "topk", "--k", "16", "--max-length", "64", "--limit", "6",
        "--docs-per-shard", "8", "--fidelity-positions", "16", "--batch-size", "8",
        "--device", "cpu", "--no-progress",
    )  # fmt: skip
    code, out = run(*pass_args)
    assert code == 0, out
    names = s3_env.find(f"{BUCKET}/store")
    assert any(n.endswith("/manifest.json") for n in names)
    assert not [n for n in names if "/claims/" in n or ".tmp-" in n]  # nothing half-written
    manifest = json.loads(s3_env.cat_file(f"{BUCKET}/store/manifest.json"))
    shards = [s["path"] for s in manifest["shards"]]
    assert len(shards) >= 2

    # an interrupted run (shard 1 and the manifest gone) resumes to the same store
    first = s3_env.cat_file(f"{BUCKET}/store/manifest.json")
    s3_env.rm(f"{BUCKET}/store/manifest.json")
    s3_env.rm(f"{BUCKET}/store/records/000001.json")
    s3_env.rm(f"{BUCKET}/store/{shards[1]}", recursive=True)
    code, out = run(*pass_args, "--resume")
    assert code == 0, out
    assert s3_env.cat_file(f"{BUCKET}/store/manifest.json") == first

    code, out = run("verify", url)
    assert code == 0 and f"{len(shards)} shards" in out, out
    # the endpoint given on the command line instead of the environment
    with monkeypatch.context() as m:
        m.setattr(fsspec.config, "conf", {})
        opts = json.dumps({"client_kwargs": {"endpoint_url": s3_server}})
        code, out = run("inspect", url, "--json", "--storage-options", opts)
    assert code == 0, out
    summary = json.loads(out)
    assert summary["documents"] == manifest["statistics"]["documents"]
    assert summary["tokens"] == manifest["statistics"]["tokens"]

    code, out = run(
        "train", "--store", url, "--student", str(tiny_student_dir), "--divergence", "fkl",
        "--out", str(tmp_path / "run"), "--max-steps", "2", "--tokens-per-step", "256",
        "--tokens-per-batch", "256", "--warmup-steps", "1", "--device", "cpu", "--no-progress",
    )  # fmt: skip
    assert code == 0, out
    metrics = [
        json.loads(line)
        for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
        if line.strip()
    ]
    steps = [m for m in metrics if "loss" in m]
    assert len(steps) == 2 and all(math.isfinite(m["loss"]) for m in steps)

    # eval of the remote store, its endpoint given on the command line, equals eval of a copy
    with monkeypatch.context() as m:
        m.setattr(fsspec.config, "conf", {})
        code, out = run(
            "eval", "--student", str(tiny_student_dir), "--store", url, "--json",
            "--device", "cpu", "--no-progress", "--storage-options", opts,
        )  # fmt: skip
        assert code == 0, out
        code, out_convert = run(
            "convert", url, "--backend", "parquet", str(tmp_path / "parquet"),
            "--no-progress", "--storage-options", opts,
        )  # fmt: skip
    assert code == 0, out_convert
    s3_env.get(f"{BUCKET}/store", str(tmp_path / "copy"), recursive=True)
    converted = open_store(str(tmp_path / "parquet"))
    assert converted.verify() == [] and converted.num_tokens == manifest["statistics"]["tokens"]
    want = evaluate(str(tiny_student_dir), str(tmp_path / "copy"), device="cpu")
    got = json.loads(out[out.index("{") :])  # after transformers' loading bar on stderr
    assert got["tokens"] == want["tokens"] == manifest["statistics"]["tokens"] - got["documents"]
    assert got["fkl"] == pytest.approx(want["fkl"], rel=1e-6)

    victim = shards[-1]
    s3_env.rm(f"{BUCKET}/store/{victim}", recursive=True)
    code, out = run("verify", url)
    assert code == 1 and victim in out and "missing" in out, out
