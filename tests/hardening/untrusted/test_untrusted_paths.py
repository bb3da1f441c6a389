"""Untrusted stores, paths and links: reading one never leaves its root.

Manifest paths that escape the root (``..``, absolute, URLs, backslashes), names no filesystem
holds, Windows device names, a file entry outside its shard or a shard named twice, glob and
control characters in paths; links out of the root (and the Hugging Face cache's links that
stay inside a repository's blobs). The hostile stores are consistent: their manifests carry
the right sizes and checksums for the crafted files (an attacker writes both), and a file a
path escapes to holds a valid shard, so a refusal can only come from the safety checks, not
from a checksum or a missing file. The store builder is in ``../_hostile.py``, ``kit`` in
``../conftest.py``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from logitstore import open_store
from logitstore.errors import LogitstoreError, ManifestError, UnsafePathError
from tests.hardening._hostile import build, manifest, rewrite

# -- paths ---------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["dotdot", "absolute", "url", "backslash", "dot"])
def test_manifest_paths_outside_the_root_are_refused(store, tmp_path, form):
    data = manifest(store)
    entry = data["shards"][0]
    name = Path(entry["path"]).name
    outside = tmp_path / "outside"
    outside.mkdir()
    src = store / entry["path"]
    shutil.copytree(src, outside / name) if src.is_dir() else shutil.copy(src, outside / name)
    new = {
        "dotdot": f"../outside/{name}",
        "absolute": str(outside / name),
        "url": f"file://{outside / name}",
        "backslash": f"..\\outside\\{name}",
        "dot": f"./../outside/{name}",
    }[form]
    old = entry["path"]
    entry["path"] = new
    entry["files"] = [[new + n[len(old) :], size] for n, size in entry["files"]]
    rewrite(store, data)
    with pytest.raises(UnsafePathError, match="escapes the store root"):
        open_store(str(store))


@pytest.mark.parametrize("form", ["long-name", "long-path", "long-escape", "long-file"])
def test_names_too_long_for_any_filesystem_are_refused_in_a_short_line(store, form, kit):
    """A path no filesystem or bucket holds (a name past 255 bytes, a path past 1024) is
    refused when the store is opened, and the message quotes it cut short: every message
    naming the shard used to carry the whole name (a 100,000-character line)."""
    data = manifest(store)
    entry = data["shards"][0]
    new = {
        "long-name": "shards/" + "a" * 100_000,
        "long-path": "shards/" + "/".join(["d" * 200] * 6) + "/000000",
        "long-escape": "../" + "é" * 50_000,
        "long-file": entry["path"],
    }[form]
    old = entry["path"]
    entry["path"] = new
    entry["files"] = [[new + n[len(old) :], size] for n, size in entry["files"]]
    if form == "long-file":
        entry["files"][0][0] = f"{new}/{'x' * 300}"
    rewrite(store, data)
    with pytest.raises(UnsafePathError, match="bytes long") as info:
        open_store(str(store))
    assert len(str(info.value)) < 400, len(str(info.value))
    result = kit.invoke("verify", store, "--no-progress")
    assert result.exit_code == 2, result.output
    assert len(result.output) < 400 and "bytes long" in result.output, result.output[:500]


@pytest.mark.parametrize("device", ["CON", "nul.parquet", "COM1", "lpt9.zarr", "AUX"])
def test_windows_device_names_in_manifest_paths_are_refused(store, device):
    """On Windows a file named CON (with any extension, in any folder) is the console: a
    read of it waits for typing; NUL, COM1, LPT9 are devices too. Such a name is refused when
    the store is opened, on every platform (a writer never makes one)."""
    data = manifest(store)
    entry = data["shards"][0]
    old, new = entry["path"], f"shards/{device}"
    entry["path"] = new
    entry["files"] = [[new + n[len(old) :], size] for n, size in entry["files"]]
    rewrite(store, data)
    with pytest.raises(UnsafePathError, match="Windows device"):
        open_store(str(store))


def test_a_file_entry_outside_its_shard_is_refused(store):
    data = manifest(store)
    data["shards"][0]["files"][0][0] = data["shards"][1]["files"][0][0]
    rewrite(store, data)
    with pytest.raises(LogitstoreError, match="outside the shard") as info:
        open_store(str(store))
    assert r"shards[0].files[0]" in str(info.value)  # the field, to find it by


def test_a_shard_path_given_twice_is_refused_naming_both_entries(store):
    data = manifest(store)
    data["shards"][1] = dict(data["shards"][0], index=1)
    rewrite(store, data)
    with pytest.raises(ManifestError, match=r"shards\[1\]\.path: .* of shards\[0\] too"):
        open_store(str(store))


def test_symlinks_out_of_the_root_are_refused(store, tmp_path):
    entry = manifest(store)["shards"][0]
    shard = store / entry["path"]
    outside = tmp_path / "elsewhere" / shard.name
    outside.parent.mkdir()
    shutil.move(shard, outside)  # identical bytes: the checksum would pass
    shard.symlink_to(outside, target_is_directory=outside.is_dir())
    opened = open_store(str(store))
    with pytest.raises(UnsafePathError, match="outside the store's root") as info:
        opened.read_shard(0)
    assert entry["path"] in str(info.value)
    assert len(opened.read_shard(1)) == 2  # the rest of the store still reads
    assert opened.verify() == [str(info.value)]

    # A link that stays inside the root is an ordinary file.
    shard.unlink()
    inside = store / "elsewhere" / shard.name
    inside.parent.mkdir()
    shutil.move(outside, inside)
    shard.symlink_to(inside, target_is_directory=inside.is_dir())
    assert len(open_store(str(store)).read_shard(0)) == 2


def test_a_linked_shards_folder_is_refused(store, tmp_path):
    shutil.move(store / "shards", tmp_path / "shards")
    (store / "shards").symlink_to(tmp_path / "shards", target_is_directory=True)
    with pytest.raises(UnsafePathError):
        open_store(str(store)).read_shard(0)


def hub_cache_download(store: Path, cache: Path) -> Path:
    """``store`` laid out as ``huggingface_hub`` downloads a repository into its cache: each
    file a blob named by its hash, and the revision's folder of links to the blobs."""
    import hashlib

    repo = cache / "datasets--org--name"
    snapshot = repo / "snapshots" / ("0" * 40)
    (repo / "blobs").mkdir(parents=True)
    for path in sorted(p for p in store.rglob("*") if p.is_file()):
        blob = repo / "blobs" / hashlib.sha256(path.read_bytes()).hexdigest()
        shutil.copyfile(path, blob)
        link = snapshot / path.relative_to(store)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot


def test_a_store_downloaded_into_the_hub_cache_reads_through_its_links(store, tmp_path, kit):
    snapshot = hub_cache_download(store, tmp_path / "hub")
    opened = open_store(str(snapshot))
    assert opened.verify() == []
    assert [d.doc_id for d in opened] == [d.doc_id for d in open_store(str(store))]
    result = kit.invoke("verify", snapshot, "--no-progress")
    assert result.exit_code == 0, result.output

    # Only links into that repository's own blobs are the store's: one to another file, or
    # through a blobs folder that is itself a link, still is refused.
    shard = snapshot / manifest(store)["shards"][0]["files"][0][0]
    target = shard.resolve()
    shard.unlink()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copyfile(target, elsewhere / target.name)
    shard.symlink_to(elsewhere / target.name)
    with pytest.raises(UnsafePathError, match="outside the store's root"):
        open_store(str(snapshot)).read_shard(0)
    shard.unlink()
    shard.symlink_to(target)
    blobs = snapshot.parent.parent / "blobs"
    shutil.move(blobs, elsewhere / "blobs")
    blobs.symlink_to(elsewhere / "blobs", target_is_directory=True)
    with pytest.raises(UnsafePathError, match="outside the store's root"):
        open_store(str(snapshot))


# -- paths fsspec would read as patterns -----------------------------------------------------


@pytest.mark.parametrize("glob", ["*", "?", "[0]"])
def test_glob_characters_in_manifest_paths_are_refused(store, glob):
    # fsspec's cat expands a pattern: on a remote store, a shard file named "shards/**" would
    # list and download every file of the store, on every read of that shard.
    data = manifest(store)
    entry = data["shards"][0]
    old = entry["path"]
    entry["path"] = old.replace("000000", f"00000{glob}")
    entry["files"] = [[entry["path"] + name[len(old) :], size] for name, size in entry["files"]]
    rewrite(store, data)
    with pytest.raises(UnsafePathError, match="glob character"):
        open_store(str(store))


def test_a_remote_store_never_globs(tmp_path):
    import fsspec

    root = build(tmp_path / "store", "parquet")
    fs = fsspec.filesystem("memory")
    fs.put(str(root), "/globbed", recursive=True)
    try:
        data = manifest(root)
        entry = data["shards"][0]
        entry["files"] = [["shards/**", entry["files"][0][1]]]
        entry["path"] = "shards"
        fs.pipe("/globbed/manifest.json", json.dumps(data).encode())
        with pytest.raises(UnsafePathError, match="glob character"):
            open_store("memory:///globbed")
    finally:
        fs.rm("/globbed", recursive=True)


# -- control characters in paths ------------------------------------------------------------


@pytest.mark.parametrize("control", ["\n", "\r", "\x1b[2J", "\x9b"])
def test_control_characters_in_manifest_paths_are_refused(store, control):
    # A path is named in messages as it is; a newline or an escape sequence in one reached
    # the terminal (a forged second "error:" line, a cleared screen).
    data = manifest(store)
    entry = data["shards"][0]
    old = entry["path"]
    entry["path"] = old + control
    entry["files"] = [[entry["path"] + name[len(old) :], size] for name, size in entry["files"]]
    rewrite(store, data)
    with pytest.raises(UnsafePathError, match="control character") as info:
        open_store(str(store))
    assert control not in str(info.value)
