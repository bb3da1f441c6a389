"""The teacher placed by an accelerate device map, and sharded by tensor parallelism under torchrun.

A device map (here with disk offload) must not change a byte of the store; tensor parallelism
changes the order of float sums, so its values match the single-process store within float32
rounding while its documents, their order and its shards are the same.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import logitstore
from logitstore.cli import main as cli_main
from logitstore.errors import ConfigError
from logitstore.pipelines._distributed import tensor_parallel_groups
from logitstore.pipelines._placement import Placement, parse_max_memory
from logitstore.pipelines._teacher import load_teacher
from logitstore.pipelines.teacher_pass import TeacherPassConfig, run_teacher_pass

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = {"k": 8, "max_length": 48, "docs_per_shard": 4, "batch_size": 4, "limit": 6}
# float32 values: the tensor-parallel store is compared by value, and a quantised value could
# land on the other side of a rounding boundary.
TP_SETTINGS = {**SETTINGS, "values": "float32"}
# Some layers on the CPU, the second decoder layer and the output head on disk.
DISK_MAP = {
    "model.embed_tokens": "cpu",
    "model.rotary_emb": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.norm": "cpu",
    "lm_head": "disk",
}


def tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def data_tree(root: Path) -> tuple[dict[str, bytes], dict]:
    """Every file's bytes but the manifest's, and the manifest without its ``run`` section
    (how the store was written: the placement differs, the data may not); and that ``run``."""
    files = tree(root)
    manifest = json.loads(files.pop("manifest.json"))
    run = manifest.pop("run")
    return {**files, "manifest.json": json.dumps(manifest, sort_keys=True).encode()}, run


def cli_args(teacher: Path, data: Path, out: Path, **settings) -> list[str]:
    args = ["--teacher", str(teacher), "--data", str(data), "--out", str(out), "--no-progress"]
    for key, value in settings.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def reference(out: Path, teacher: Path, data: Path, threads: int | None = None, **settings):
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)  # torchrun runs each rank with one thread
    try:
        cfg = TeacherPassConfig(
            teacher=str(teacher), data=str(data), out=str(out), progress=False, **settings
        )
        return run_teacher_pass(cfg)
    finally:
        torch.set_num_threads(before)


def verify(store: Path) -> str:
    result = CliRunner().invoke(cli_main, ["verify", str(store)])
    assert result.exit_code == 0, result.output
    return result.output


def assert_same_documents(got: Path, want: Path, atol: float) -> None:
    """Same shards, documents and order; float fields within ``atol``, ids exact."""
    a_store, b_store = logitstore.open_store(str(got)), logitstore.open_store(str(want))
    a_man = json.loads((got / "manifest.json").read_text())
    b_man = json.loads((want / "manifest.json").read_text())
    keys = ("index", "path", "documents", "tokens", "positions")
    assert [{k: s[k] for k in keys} for s in a_man["shards"]] == [
        {k: s[k] for k in keys} for s in b_man["shards"]
    ]
    assert a_store.num_documents == b_store.num_documents > a_store.num_shards > 1
    for a, b in zip(a_store.iter_documents(), b_store.iter_documents(), strict=True):
        assert a.doc_id == b.doc_id
        np.testing.assert_array_equal(a.input_ids, b.input_ids)
        np.testing.assert_array_equal(a.loss_mask, b.loss_mask)
        np.testing.assert_array_equal(a.support_ids, b.support_ids)
        np.testing.assert_allclose(a.support_logprobs, b.support_logprobs, atol=atol)
        np.testing.assert_allclose(a.label_logprob, b.label_logprob, atol=atol)
        # tails are float16: a value near a rounding boundary may round to the next one
        np.testing.assert_allclose(a.tail_logmass, b.tail_logmass, atol=atol, rtol=2.0**-10)


# -- options ---------------------------------------------------------------------------------


def test_placement_options_are_parsed_and_checked(tmp_path):
    assert parse_max_memory("0=20GiB, 1=20GiB,cpu=60GiB") == {
        0: "20GiB",
        1: "20GiB",
        "cpu": "60GiB",
    }
    assert parse_max_memory({"cpu": 1000}) == {"cpu": 1000}
    with pytest.raises(ConfigError, match="DEVICE=SIZE"):
        parse_max_memory("20GiB")
    path = tmp_path / "map.json"
    path.write_text(json.dumps(DISK_MAP))
    placed = Placement.resolve(str(path), offload_folder="off")
    assert placed.device_map == DISK_MAP and placed.describe()["device_map"] == {
        "file": "map.json", "modules": 6, "devices": ["cpu", "disk"]
    }  # fmt: skip
    assert Placement.resolve("auto", "cpu=1GiB").max_memory == {"cpu": "1GiB"}
    with pytest.raises(ConfigError, match="no such file"):
        Placement.resolve(str(tmp_path / "missing.json"))
    with pytest.raises(ConfigError, match="exclusive"):
        Placement.resolve("auto", tensor_parallel=2)
    with pytest.raises(ConfigError, match="needs a device_map"):
        Placement.resolve(None, "cpu=1GiB")
    cfg = TeacherPassConfig(teacher="t", data="d", out="o", device="cpu", device_map="auto")
    with pytest.raises(ConfigError, match="exclusive"):
        cfg.placement()


def test_a_device_map_is_one_process_per_machine(monkeypatch):
    cfg = TeacherPassConfig(teacher="t", data="d", out="o", device_map="auto")
    assert cfg.placement().device_map == "auto"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # as torchrun --nproc-per-node 2 sets it
    with pytest.raises(ConfigError, match="found 2 processes on this one"):
        cfg.placement()


def test_tensor_parallel_groups_are_consecutive_ranks():
    assert [tensor_parallel_groups(r, 4, 2) for r in range(4)] == [
        (0, 2, 0), (0, 2, 1), (1, 2, 0), (1, 2, 1)
    ]  # fmt: skip
    assert tensor_parallel_groups(3, 4, 1) == (3, 4, 0)  # no tensor parallelism: a rank a group
    with pytest.raises(ConfigError, match="multiple of 2 processes, found 3"):
        tensor_parallel_groups(0, 3, 2)


def test_a_model_type_without_a_plan_is_refused_before_loading(tmp_path, tiny_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=len(tiny_tokenizer), n_embd=16, n_layer=1, n_head=2)
    GPT2LMHeadModel(config).save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=r"model type 'gpt2' has no tensor-parallel plan"):
        load_teacher(str(tmp_path), device="cpu", placement=Placement(tensor_parallel=2))


def one_kv_head_llama(path: Path, tokenizer) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=1,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_a_size_that_does_not_divide_the_heads_is_refused_before_loading(tmp_path, tiny_tokenizer):
    teacher = one_kv_head_llama(tmp_path, tiny_tokenizer)
    with pytest.raises(ConfigError, match=r"has 1 key-value head, which 2 ranks cannot split"):
        load_teacher(str(teacher), device="cpu", placement=Placement(tensor_parallel=2))


# -- device map ------------------------------------------------------------------------------


def test_device_map_with_disk_offload_writes_the_plain_store(
    tmp_path, tiny_teacher_dir, text_jsonl
):
    plain = tmp_path / "plain"
    reference(plain, tiny_teacher_dir, text_jsonl, dtype="float32", **SETTINGS)
    map_file, offload = tmp_path / "map.json", tmp_path / "offload"
    map_file.write_text(json.dumps(DISK_MAP))
    placed = tmp_path / "placed"
    args = cli_args(tiny_teacher_dir, text_jsonl, placed, dtype="float32", **SETTINGS)
    result = CliRunner().invoke(
        cli_main,
        ["teacher-pass", *args, "--device-map", str(map_file), "--offload-folder", str(offload)],
    )
    assert result.exit_code == 0, result.output
    assert "device map {'file': 'map.json'" in result.output
    # The same placement loaded here: the disk entries are not in memory (meta tensors; their
    # weights are read from the checkpoint at each forward), the others are.
    teacher = load_teacher(str(tiny_teacher_dir), placement=Placement.resolve(str(map_file)))
    where = {n: p.device.type for n, p in teacher.model.named_parameters()}
    assert where["lm_head.weight"] == "meta" and where["model.layers.0.mlp.up_proj.weight"] == "cpu"
    assert {d for n, d in where.items() if n.startswith("model.layers.1.")} == {"meta"}

    assert verify(placed).split(":")[1] == verify(plain).split(":")[1]
    (got, placed_run), (want, plain_run) = data_tree(placed), data_tree(plain)
    # The manifest records the placement as run information, not as a setting of the store.
    assert placed_run["placement"]["device_map"]["file"] == "map.json"
    assert "disk" in placed_run["placement"]["device_map"]["devices"]
    assert plain_run["placement"] == {"device_map": None, "max_memory": None, "tensor_parallel": 1}
    assert sorted(got) == sorted(want)
    for name in want:
        if name.endswith(".json"):  # no times in a store; compared as JSON too, for a clear diff
            assert json.loads(got[name]) == json.loads(want[name]), name
        assert got[name] == want[name], name
    assert_same_documents(placed, plain, atol=0.0)


def test_device_map_strategy_with_a_memory_budget_offloads_and_matches(
    tmp_path, tiny_teacher_dir, text_jsonl
):
    placement = Placement.resolve("sequential", "cpu=200KB", str(tmp_path / "offload"))
    teacher = load_teacher(str(tiny_teacher_dir), dtype="float32", placement=placement)
    assert "disk" in set(teacher.model.hf_device_map.values())  # 200 KB cannot hold it all
    assert teacher.device == torch.device("cpu") and teacher.vocab_size == 384
    placed, plain = tmp_path / "placed", tmp_path / "plain"
    cfg = TeacherPassConfig(
        teacher=str(tiny_teacher_dir), data=str(text_jsonl), out=str(placed), progress=False,
        dtype="float32", **SETTINGS,
    )  # fmt: skip
    summary = run_teacher_pass(cfg, teacher=teacher)
    assert summary["placement"]["device_map"] == "sequential"
    assert summary["placement"]["max_memory"] == {"cpu": "200KB"}
    reference(plain, tiny_teacher_dir, text_jsonl, dtype="float32", **SETTINGS)
    (got, run), (want, _) = data_tree(placed), data_tree(plain)
    assert got == want
    assert run["placement"]["device_map"] == "sequential"


# -- tensor parallelism under torchrun ----------------------------------------------------------


def descendants(pid: int) -> list[int]:
    """``pid``'s child processes and theirs (torchrun starts each rank in its own session)."""
    try:
        kids = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []
    return [k for c in kids for k in (c, *descendants(c))]


def committed_records(records: Path) -> list[Path]:
    """Shard records, not the temporary names they are written under (``.tmp-...``)."""
    return (
        [p for p in records.glob("*.json") if not p.name.startswith(".")]
        if records.exists()
        else []
    )


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}


def torchrun(nproc: int, *args: str) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
        str(nproc), "-m", "logitstore.pipelines.teacher_pass", *args,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def tp_store(tmp_path_factory, tiny_teacher_dir, text_jsonl) -> Path:
    out = tmp_path_factory.mktemp("tp") / "store"
    cmd = torchrun(2, *cli_args(tiny_teacher_dir, text_jsonl, out, **TP_SETTINGS),
                   "--tensor-parallel", "2")  # fmt: skip
    result = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    shards = logitstore.open_store(str(out)).num_shards
    # The group's first rank committed every shard; the other only took part in the forwards.
    assert sorted(re.findall(r"wrote (\d+) of \d+ shards", result.stdout)) == ["0", str(shards)]
    assert "tensor parallel 2" in result.stdout
    return out


@pytest.mark.integration
def test_tensor_parallel_matches_the_single_process_store(
    tmp_path, tp_store, tiny_teacher_dir, text_jsonl
):
    ref = tmp_path / "reference"
    reference(ref, tiny_teacher_dir, text_jsonl, threads=1, **TP_SETTINGS)
    verify(tp_store)
    # Placement is not a setting: the settings are byte-identical, so either store resumes
    # under the other placement.
    assert (tp_store / "settings.json").read_bytes() == (ref / "settings.json").read_bytes()
    assert_same_documents(tp_store, ref, atol=1e-5)
    run = json.loads((tp_store / "manifest.json").read_text())["run"]
    assert run["placement"]["tensor_parallel"] == 2


@pytest.mark.integration
def test_tensor_parallel_refuses_a_model_type_without_a_plan(tmp_path, tiny_tokenizer, text_jsonl):
    from transformers import GPT2Config, GPT2LMHeadModel

    teacher = tmp_path / "gpt2"
    config = GPT2Config(vocab_size=len(tiny_tokenizer), n_embd=16, n_layer=1, n_head=2)
    GPT2LMHeadModel(config).save_pretrained(teacher)
    tiny_tokenizer.save_pretrained(teacher)
    out = tmp_path / "store"
    cmd = torchrun(2, *cli_args(teacher, text_jsonl, out, **SETTINGS), "--tensor-parallel", "2")
    result = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "model type 'gpt2' has no tensor-parallel plan" in result.stderr, result.stderr[-6000:]
    assert not out.exists()  # refused before the store, let alone a shard, was written


@pytest.mark.integration
def test_tensor_parallel_refuses_a_size_that_does_not_divide_the_heads(
    tmp_path, tiny_tokenizer, text_jsonl
):
    """transformers splits the key-value heads without a check: the first forward failed with
    a reshape error deep in the attention, after the weights loaded."""
    teacher = one_kv_head_llama(tmp_path / "teacher", tiny_tokenizer)
    out = tmp_path / "store"
    cmd = torchrun(2, *cli_args(teacher, text_jsonl, out, **SETTINGS), "--tensor-parallel", "2")
    result = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "error: --tensor-parallel 2: the teacher has 1 key-value head" in result.stderr, (
        result.stderr[-6000:]
    )
    assert not re.search(r"\[rank\d\]: Traceback", result.stderr)  # one line, no traceback
    assert not out.exists()


@pytest.mark.integration
def test_tensor_parallel_killed_and_resumed_gives_the_same_store(
    tmp_path, tp_store, tiny_teacher_dir, text_jsonl
):
    out = tmp_path / "killed"
    args = [*cli_args(tiny_teacher_dir, text_jsonl, out, **TP_SETTINGS), "--tensor-parallel", "2"]
    proc = subprocess.Popen(
        torchrun(2, *args), cwd=ROOT, env=env(), stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    records, deadline = out / "records", time.monotonic() + 240
    try:
        while not committed_records(records):
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "the pass committed no shard in time"
            time.sleep(0.002)
    finally:
        for pid in [*descendants(proc.pid), proc.pid]:  # both ranks, then torchrun
            os.kill(pid, signal.SIGKILL)
        proc.wait()
    assert not (out / "manifest.json").exists(), "the pass finished before the kill"
    committed = len(committed_records(records))

    cmd = torchrun(2, *args, "--resume")
    result = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    store = logitstore.open_store(str(out))
    assert f"wrote {store.num_shards - committed} of {store.num_shards} shards" in result.stdout
    assert tree(out) == tree(tp_store)  # byte-identical to the uninterrupted run


@pytest.mark.integration
def test_a_commit_failure_stops_the_whole_tensor_parallel_group(
    tmp_path, tp_store, tiny_teacher_dir, text_jsonl
):
    """The leader fails alone (its shard is committed meanwhile); the group stops together.

    Without the group's check after each batch, the leader would meet the other rank in
    mismatched collectives (one in the next forward, one in the world's error check): an abort
    that loses the error message under gloo, a wait until the collective timeout under NCCL.
    """
    from logitstore import format as fmt

    out = tmp_path / "store"
    # A shard in the middle: its commit fails in the leader's worker, and the leader learns of it
    # at its next batch, while the other rank is about to enter that batch's forward.
    middle = logitstore.open_store(str(tp_store)).num_shards // 2
    args = [*cli_args(tiny_teacher_dir, text_jsonl, out, **TP_SETTINGS), "--tensor-parallel", "2"]
    proc = subprocess.Popen(
        torchrun(2, *args), cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 240
    while not committed_records(out / "records"):
        assert proc.poll() is None and time.monotonic() < deadline, "no shard committed in time"
        time.sleep(0.002)
    (out / fmt.record_name(middle)).write_text("{}")  # as if another writer committed it
    try:
        _, stderr = proc.communicate(timeout=120)
    finally:
        for pid in [*descendants(proc.pid), proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert f"shard {middle} is already committed" in stderr
    assert not (out / "manifest.json").exists()


@pytest.mark.slow  # four ranks, about 20 s on two cores: make test-all
@pytest.mark.integration
def test_two_tensor_parallel_groups_split_the_shards_into_the_same_store(
    tmp_path, tp_store, tiny_teacher_dir, text_jsonl
):
    out = tmp_path / "groups"
    cmd = torchrun(4, *cli_args(tiny_teacher_dir, text_jsonl, out, **TP_SETTINGS),
                   "--tensor-parallel", "2")  # fmt: skip
    result = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    shards = logitstore.open_store(str(out)).num_shards
    written = sorted(int(n) for n in re.findall(r"wrote (\d+) of \d+ shards", result.stdout))
    # Ranks 0 and 2 lead the two groups: shards 0, 2, 4, ... and 1, 3, 5, ...
    assert written == [0, 0, shards // 2, shards - shards // 2]
    assert tree(out) == tree(tp_store)  # the same computation per group: the same bytes
