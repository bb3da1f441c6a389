"""The link check's path resolution: the same answer as ``os.path.realpath``, with fewer calls."""

from __future__ import annotations

import os

from logitstore.storage import _fs


def test_resolution_matches_realpath_through_links(tmp_path, monkeypatch):
    root = tmp_path / "store"
    (root / "shards" / "a.zarr" / "ids0" / "c").mkdir(parents=True)
    (root / "shards" / "a.zarr" / "ids0" / "c" / "0").write_bytes(b"x")
    outside = tmp_path / "outside"
    (outside / "deep").mkdir(parents=True)
    (outside / "deep" / "f").write_bytes(b"y")
    # A folder link out of the store, a file link out, a link that stays inside, a dangling one.
    (root / "shards" / "b.zarr").symlink_to(outside)
    (root / "shards" / "a.zarr" / "ids1").symlink_to(outside / "deep" / "f")
    (root / "shards" / "c.zarr").symlink_to(root / "shards" / "a.zarr")
    (root / "shards" / "d.zarr").symlink_to(tmp_path / "missing")
    names = [
        "shards/a.zarr/ids0/c/0",
        "shards/a.zarr/ids0/zarr.json",  # missing file
        "shards/b.zarr/deep/f",
        "shards/a.zarr/ids1",
        "shards/c.zarr/ids0/c/0",
        "shards/d.zarr/x/y",
        "shards/../../outside/deep/f",
        "shards//a.zarr",
    ]
    local = str(root)
    resolve = _fs._Resolver(local, os.path.realpath(local))
    got = [resolve(f"{local}/{n}") for n in names]
    assert got == [os.path.realpath(f"{local}/{n}") for n in names]
    assert got[2] == str(outside / "deep" / "f") and got[4].startswith(os.path.realpath(local))
    # Plain names: each folder below the root is examined once, not once per file under it.
    resolve = _fs._Resolver(local, os.path.realpath(local))
    calls = []
    real_lstat = os.lstat
    monkeypatch.setattr(os, "lstat", lambda p: calls.append(p) or real_lstat(p))
    files = [f"shards/a.zarr/ids0/{n}" for n in ("c/0", "zarr.json", "c/1", "c/2")]
    assert [resolve(f"{local}/{n}") for n in files] == [str(root / n) for n in files]
    assert sum(p.endswith("/shards") for p in calls) == 1
    assert len(calls) == 8  # shards, a.zarr, ids0, c and the four files, once each


def test_a_link_out_of_a_store_is_still_refused(tmp_path):
    root = tmp_path / "store"
    (root / "shards").mkdir(parents=True)
    (tmp_path / "secret").write_bytes(b"s")
    (root / "shards" / "f").symlink_to(tmp_path / "secret")
    fs, path = _fs.url_to_fs(str(root), None)
    try:
        _fs.refuse_links_out(fs, path, [_fs.join(path, "shards/f")], "shard x")
    except Exception as exc:  # noqa: BLE001 - the type is checked below
        assert type(exc).__name__ == "UnsafePathError" and "outside the store" in str(exc)
    else:
        raise AssertionError("a link out of the store was accepted")
