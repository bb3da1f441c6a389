"""Hub push: ``logitstore push`` and ``hub.push_store`` against a stand-in ``HfApi``.

The stores are written by ``make_store`` of ``conftest.py``.
"""

from __future__ import annotations

import inspect
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

import logitstore.hub as hub
from logitstore import open_store
from logitstore.cli import main
from logitstore.errors import HubAuthError


def test_push_without_license_or_token_is_a_clear_error(tmp_path, monkeypatch, make_store):
    import huggingface_hub

    FakeApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_secret")
    src = make_store(str(tmp_path / "src"), "topk", {"k": 8})
    result = CliRunner().invoke(main, ["push", src, "org/name"])
    assert result.exit_code == 2 and "--license" in result.output
    assert len(result.output.strip().splitlines()) == 1 and FakeApi.calls == []
    result = CliRunner().invoke(main, ["push", src, "org/name", "--license", "Apache 2"])
    assert result.exit_code == 2 and "license identifier" in result.output
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(HubAuthError, match="HF_TOKEN"):
        hub.push_store(src, "org/name", license="mit")
    result = CliRunner().invoke(main, ["push", src, "org/name", "--license", "mit"])
    assert result.exit_code == 2 and "token" in result.output
    assert not (tmp_path / "src" / "README.md").exists() and FakeApi.calls == []


class FakeApi:
    """Stands in for ``huggingface_hub.HfApi`` (2.x: ``upload_folder`` is the resumable
    upload) at the network boundary; records the calls and keeps a copy of what was sent."""

    calls: list = []
    snapshot: Path | None = None

    def __init__(self, token=None):
        FakeApi.calls.append(("init", token))

    def create_repo(self, repo_id, **kw):
        FakeApi.calls.append(("create_repo", repo_id, kw))

    def create_branch(self, repo_id, **kw):
        FakeApi.calls.append(("create_branch", repo_id, kw))

    def upload_folder(self, *, folder_path, **kw):
        FakeApi.calls.append(("upload_folder", {"folder_path": folder_path, **kw}))
        shutil.copytree(folder_path, FakeApi.snapshot)
        return "https://hub.example/commit/1"


class FakeLargeApi(FakeApi):
    """``HfApi`` of ``huggingface_hub`` before 2.0, which has ``upload_large_folder``."""

    def upload_large_folder(self, repo_id, folder_path, **kw):
        FakeApi.calls.append(
            ("upload_large_folder", {"repo_id": repo_id, "folder_path": folder_path, **kw})
        )
        shutil.copytree(folder_path, FakeApi.snapshot)


def _binds_to_installed_hfapi(kind: str, kwargs: dict) -> None:
    """The arguments push passed are accepted by the installed ``HfApi`` method, if it has it."""
    import huggingface_hub

    method = getattr(huggingface_hub.HfApi, kind, None)
    if method is not None:
        inspect.signature(method).bind(None, **kwargs)


@pytest.mark.parametrize("api", [FakeApi, FakeLargeApi], ids=["upload_folder", "large_folder"])
def test_push_exports_then_uploads_resumably(tmp_path, monkeypatch, api, make_store):
    import huggingface_hub

    src = make_store(str(tmp_path / "src"), "topk", {"k": 8})
    FakeApi.calls, FakeApi.snapshot = [], tmp_path / "uploaded"
    monkeypatch.setattr(huggingface_hub, "HfApi", api)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_secret")
    args = ["push", src, "org/name", "--private", "--revision", "v1", "--license", "mit"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "resumable" in result.output and "run the same push again" in result.output
    upload = "upload_folder" if api is FakeApi else "upload_large_folder"
    kinds = [c[0] for c in FakeApi.calls]
    assert kinds == ["init", "create_repo", "create_branch", upload]
    assert FakeApi.calls[0][1] == "hf_secret"
    assert FakeApi.calls[1][2] == {"repo_type": "dataset", "private": True, "exist_ok": True}
    assert FakeApi.calls[2][2]["branch"] == "v1"
    sent = FakeApi.calls[3][1]
    assert sent["revision"] == "v1" and sent["repo_type"] == "dataset"
    _binds_to_installed_hfapi(upload, sent)
    uploaded = open_store(str(FakeApi.snapshot))
    assert uploaded.verify() == [] and len(uploaded) == len(open_store(src))
    from huggingface_hub import DatasetCard

    card = DatasetCard.load(FakeApi.snapshot / "README.md")
    assert card.data.license == "mit" and "hf://datasets/org/name" in card.text
    # an existing export is uploaded as it is; its card's license serves without --license
    FakeApi.calls, FakeApi.snapshot = [], tmp_path / "uploaded2"
    hub.push_store(str(tmp_path / "uploaded"), "org/name")
    assert FakeApi.calls[-1][1]["folder_path"] == str(tmp_path / "uploaded")
    assert sorted(p.name for p in FakeApi.snapshot.iterdir()) == sorted(
        p.name for p in (tmp_path / "uploaded").iterdir()
    )


def test_push_sets_the_license_of_an_export_without_one(tmp_path, monkeypatch, make_store):
    import huggingface_hub
    from huggingface_hub import DatasetCard

    src = make_store(str(tmp_path / "src"), "topk", {"k": 8})
    hub.export_store(src, str(tmp_path / "export"))
    before = DatasetCard.load(tmp_path / "export" / "README.md")
    assert before.data.license is None
    FakeApi.calls, FakeApi.snapshot = [], tmp_path / "uploaded"
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_secret")
    with pytest.raises(hub.ConfigError, match="--license"):
        hub.push_store(str(tmp_path / "export"), "org/name")
    hub.push_store(str(tmp_path / "export"), "org/name", license="cc-by-4.0")
    after = DatasetCard.load(FakeApi.snapshot / "README.md")
    assert after.data.license == "cc-by-4.0" and after.text == before.text
    assert after.data.to_dict()["dataset_info"] == before.data.to_dict()["dataset_info"]


@pytest.mark.parametrize(
    "front",
    [
        b"license: " + b"[" * 5000 + b"]" * 5000,  # nested past Python's recursion limit
        b"license: [mit",  # not YAML
        b"license: \xff",  # not UTF-8
        b"license: [mit, apache-2.0]",  # not one identifier
        b"license: '../x y'",
    ],
)
def test_pushing_an_export_whose_card_is_malformed_is_a_clear_error(
    tmp_path, monkeypatch, front, make_store
):
    """An export folder may be a stranger's (downloaded to be re-published): its card is
    refused with a ConfigError, never a RecursionError, YAML or Unicode error."""
    import huggingface_hub

    src = make_store(str(tmp_path / "src"), "topk", {"k": 8}, shards=1)
    hub.export_store(src, str(tmp_path / "export"))
    card = tmp_path / "export" / "README.md"
    card.write_bytes(b"---\n" + front + b"\n---\n" + card.read_bytes().split(b"\n---\n", 1)[1])
    FakeApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_secret")
    result = CliRunner().invoke(main, ["push", str(tmp_path / "export"), "org/name"])
    assert result.exit_code == 2, (result.output, result.exception)
    assert "README.md" in result.output and "Traceback" not in result.output
    assert FakeApi.calls == []


@pytest.mark.parametrize("link", ["file", "folder", "fifo"])
def test_pushing_an_export_with_a_link_out_of_it_uploads_nothing(
    tmp_path, monkeypatch, link, make_store
):
    """An export folder is uploaded as it is, and the upload reads each file through its
    links: one leading outside the folder (to a key, a home folder) is refused before anything
    is sent, as is a FIFO (which would block the upload)."""
    import os

    import huggingface_hub

    src = make_store(str(tmp_path / "src"), "topk", {"k": 8}, shards=1)
    export = tmp_path / "export"
    hub.export_store(src, str(export), license="mit")
    secret = tmp_path / "home" / "id_rsa"
    secret.parent.mkdir()
    secret.write_bytes(b"SECRET KEY")
    if link == "file":
        (export / "data" / "extra.parquet").symlink_to(secret)
    elif link == "folder":
        (export / "data" / "more").symlink_to(secret.parent, target_is_directory=True)
    else:
        os.mkfifo(export / "data" / "extra.parquet")
    FakeApi.calls, FakeApi.snapshot = [], tmp_path / "uploaded"
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_secret")
    result = CliRunner().invoke(main, ["push", str(export), "org/name"])
    assert result.exit_code == 2, (result.output, result.exception)
    assert "Traceback" not in result.output and "SECRET" not in result.output
    assert "data/" in result.output and len(result.output.strip().splitlines()) == 1
    assert FakeApi.calls == [] and not FakeApi.snapshot.exists()
