"""Hostile stores, reads: links, special files, malformed URLs and a hostile HTTP server, each
read by the CLI in a child process whose address space may grow by at most 1.5 GiB and refused;
and processes reading Parquet stores exit cleanly.

Shard files and manifests linked out of the store, on every URL form (plain, ``simplecache::``,
``filecache::``, ``file://``), a FIFO in the store, malformed paths, and a server that sends
more than a file holds (ignoring the range, or a gzip body of gigabytes).

How the stores are built (consistent, as an attacker writes them) and what a clean refusal
is: ``../_hostile.py``. ``zarr_store``, ``kit`` and the limited child processes are in
``../conftest.py``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.hardening._hostile import GIB, build, manifest, refused, run_limited_cli, run_verify

pytestmark = pytest.mark.integration


# -- links and paths, on every URL form -------------------------------------------------------

FORMS = ["{}", "simplecache::{}", "filecache::{}", "file://{}"]
SECRET = b"SECRET-OUTSIDE-THE-STORE-" * 40


def outside_files(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A folder beside the store holding a secret; its listing and hashes, to compare."""
    folder = tmp_path / "outside"
    folder.mkdir(exist_ok=True)
    (folder / "secret.bin").write_bytes(SECRET)
    return folder, hashes(folder)


def hashes(folder: Path) -> dict[str, str]:
    import hashlib

    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("form", FORMS)
def test_a_shard_file_linked_out_is_refused_on_every_url_form(store, tmp_path, form, kit):
    folder, before = outside_files(tmp_path)
    entry = manifest(store)["shards"][0]
    target = store / (
        entry["path"] if entry["path"].endswith(".parquet") else entry["files"][-1][0]
    )
    target.unlink()
    target.symlink_to(folder / "secret.bin")
    kit.reseal(store)  # the manifest matches the secret's bytes: only the link check can refuse
    out = refused(run_verify(form.format(store)), "outside the store's root", entry["path"])
    assert "SECRET" not in out
    assert hashes(folder) == before


@pytest.mark.parametrize("form", FORMS)
def test_a_manifest_linked_out_is_refused_on_every_url_form(store, tmp_path, form):
    folder, _ = outside_files(tmp_path)
    shutil.move(store / "manifest.json", folder / "manifest.json")
    (store / "manifest.json").symlink_to(folder / "manifest.json")
    before = hashes(folder)
    for command in ("inspect", "verify"):
        report = run_limited_cli(command, form.format(store))
        assert report["exit_code"] == 2, report
        refused(report, "manifest.json", "outside the store's root")
    assert hashes(folder) == before


def test_a_fifo_in_the_store_is_refused_without_being_opened(store):
    entry = manifest(store)["shards"][0]
    target = store / (
        entry["path"] if entry["path"].endswith(".parquet") else entry["files"][-1][0]
    )
    target.unlink()
    os.mkfifo(target)  # opening it would block the reader forever
    refused(run_limited_cli("verify", store, timeout=90), "not a regular file")


@pytest.mark.parametrize("form", ["nope::{}", "{}/manifest.json", "{}/manifest.json/x", "dir"])
def test_malformed_paths_get_our_errors(store, form):
    if form == "dir":
        (store / "manifest.json").unlink()
        (store / "manifest.json").mkdir()
        url = str(store)
    else:
        url = form.format(store)
    report = run_limited_cli("inspect", url)
    assert report["exit_code"] == 2, report
    out = refused(report)
    assert out.startswith("error: ") and out.count("\n") == 1, out


# -- Parquet stores exit cleanly ------------------------------------------------------------

_READ_ALL = """
import sys
from logitstore import open_store
store = open_store(sys.argv[1], readahead=2)
for j in range(store.num_shards):
    store.read_shard(j)
assert sum(1 for _ in store.iter_documents()) == len(store)
"""


@pytest.mark.slow  # 30 processes, about 45 s on two cores: make test-all
def test_parquet_reading_processes_all_exit_cleanly(tmp_path):
    # pq.read_table's thread pool used to release a reader (and the bytes it wraps) at
    # interpreter exit, after the GIL was gone: about one run in ten aborted with
    # "terminate called without an active exception" (exit 134).
    root = build(tmp_path / "store", "parquet", shards=4)
    codes: list[tuple[int, str]] = []
    running: list[subprocess.Popen] = []
    for _ in range(30):
        running.append(subprocess.Popen(
            [sys.executable, "-c", _READ_ALL, str(root)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        ))  # fmt: skip
        if len(running) == 2:  # two at a time: short processes, many exits
            proc = running.pop(0)
            codes.append((proc.wait(timeout=300), proc.stderr.read()))  # type: ignore[union-attr]
    for proc in running:
        codes.append((proc.wait(timeout=300), proc.stderr.read()))  # type: ignore[union-attr]
    assert len(codes) == 30
    assert [code for code, _ in codes] == [0] * 30, [err[-500:] for code, err in codes if code]


# -- a store served over HTTP by a server that sends more than it is asked for ---------------


def gzip_of_zeros(gib: int) -> bytes:
    """A gzip stream of ``gib`` GiB of zero bytes in about a MiB per GiB: one fully flushed
    deflate block of a MiB, repeated (its trailer's checksum is wrong, found only at the end)."""
    import zlib

    z = zlib.compressobj(9, zlib.DEFLATED, 31)
    first = z.compress(bytes(2**20)) + z.flush(zlib.Z_FULL_FLUSH)
    block = z.compress(bytes(2**20)) + z.flush(zlib.Z_FULL_FLUSH)
    return first + block * (gib * 1024 - 1) + z.flush()


def serve(root: Path, hostile: str, form: str) -> tuple[str, Any, dict[str, int]]:
    """``root`` over HTTP as a simple server serves it (no ``Range``: every file whole), but the
    file ``hostile`` comes with 2 GiB more after its bytes (``padded``) or as a gzip body of
    2 GiB (``gzip``). Returns the URL, the server and the bytes it managed to send of it."""
    import http.server
    import threading

    sent = {"bytes": 0}
    bomb = gzip_of_zeros(2) if form == "gzip" else b""

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_HEAD(self) -> None:
            self.reply(body=False)

        def do_GET(self) -> None:
            self.reply(body=True)

        def reply(self, body: bool) -> None:
            path = root / self.path.lstrip("/")
            if not path.is_file():
                self.send_response(404)
                self.end_headers()
                return
            data = path.read_bytes()
            special = body and self.path.lstrip("/") == hostile
            self.send_response(200)
            if special and form == "gzip":
                self.send_header("Content-Encoding", "gzip")
                data = bomb
            length = len(data) + (2 * GIB if special and form == "padded" else 0)
            self.send_header("Content-Length", str(length))
            self.end_headers()
            if not body:
                return
            try:
                self.wfile.write(data)
                if special:
                    sent["bytes"] += len(data)
                for _ in range(2048 if special and form == "padded" else 0):
                    self.wfile.write(bytes(2**20))
                    sent["bytes"] += 2**20
            except OSError:
                pass  # the reader stopped reading: what it did not take was never sent

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}", server, sent


@pytest.mark.parametrize("form", ["padded", "gzip"])
def test_a_server_sending_more_than_a_file_holds_is_read_no_further(store, form):
    """A reader asks for a file's declared size and one byte more; a server may ignore the
    range and send 2 GiB, or send a 2 MiB gzip body of 2 GiB (decoded on the way). Either way
    the reader takes what it asked for and refuses the file as longer than declared."""
    pytest.importorskip("aiohttp")
    entry = manifest(store)["shards"][0]
    name = entry["files"][-1][0]
    url, server, sent = serve(store, name, form)
    try:
        out = refused(run_verify(url), name, "has more than")
    finally:
        server.shutdown()
        server.server_close()
    assert "MemoryError" not in out and "Payload" not in out, out
    if form == "padded":
        assert sent["bytes"] < 256 * 2**20, sent  # the rest was never read
