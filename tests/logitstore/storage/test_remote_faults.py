"""Network faults between the reader and a real S3-compatible server (moto, server mode).

A small HTTP proxy on 127.0.0.1 forwards the client's requests to moto and, for requests
whose path matches a rule, answers 503, resets the connection, stalls past the client's
read timeout, or answers 403 instead. The client's own retries (s3fs, botocore) are turned
off, so what is measured is the reader's: a transient fault is retried, then reported as a
network error naming the URL; only a missing object is reported as missing.
"""

from __future__ import annotations

import http.client
import socket
import struct
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from logitstore import open_store
from logitstore.errors import CorruptShardError, StoreReadError
from logitstore.storage import _remote

pytestmark = pytest.mark.integration

BUCKET = "faults"
_ERROR = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
    b"<Message>injected</Message></Error>"
)


class Faults:
    """Rules ``(substring, mode, times)``: the next ``times`` GETs whose path holds the
    substring get ``mode`` (``times=None``: every one). Counts every GET per path."""

    def __init__(self) -> None:
        self.rules: list[list] = []
        self.gets: Counter[str] = Counter()
        self.sent: Counter[str] = Counter()  # body bytes sent back per path
        self.lock = threading.Lock()

    def add(self, substring: str, mode: str, times: int | None = None) -> None:
        self.rules.append([substring, mode, times])

    def take(self, method: str, path: str) -> str | None:
        with self.lock:
            if method == "GET":
                self.gets[path.split("?")[0]] += 1
            for rule in self.rules:
                if method == "GET" and rule[0] in path and rule[2] != 0:
                    rule[2] = None if rule[2] is None else rule[2] - 1
                    return str(rule[1])
        return None

    def count(self, substring: str) -> int:
        return sum(n for path, n in self.gets.items() if substring in path)


class _Proxy(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    def _forward(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        mode = self.server.faults.take(self.command, self.path)  # type: ignore[attr-defined]
        if mode == "reset":  # RST instead of a response
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            return
        if mode == "stall":  # longer than the client's read timeout
            time.sleep(1.5)
            self.close_connection = True
            return
        if mode in ("503", "403"):
            code = b"ServiceUnavailable" if mode == "503" else b"AccessDenied"
            data = _ERROR.replace(b"{code}", code)
            self.send_response(int(mode))
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        conn = http.client.HTTPConnection(*self.server.upstream, timeout=30)  # type: ignore[attr-defined]
        headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
        conn.request(self.command, self.path, body=body or None, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        self.send_response(resp.status)
        for key, value in resp.getheaders():
            if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
            with self.server.faults.lock:  # type: ignore[attr-defined]
                self.server.faults.sent[self.path.split("?")[0]] += len(data)  # type: ignore[attr-defined]
        conn.close()

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward


@pytest.fixture(scope="module")
def servers():
    moto_server = pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    moto = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    proxy = ThreadingHTTPServer(("127.0.0.1", 0), _Proxy)
    proxy.upstream = moto.get_host_and_port()  # type: ignore[attr-defined]
    proxy.faults = Faults()  # type: ignore[attr-defined]
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    host, port = moto.get_host_and_port()
    yield f"http://{host}:{port}", f"http://127.0.0.1:{proxy.server_address[1]}", proxy
    proxy.shutdown()
    moto.stop()


def options(endpoint: str) -> dict:
    # One attempt per request below the reader: botocore's and s3fs's retries off.
    return {
        "client_kwargs": {"endpoint_url": endpoint}, "key": "k", "secret": "s",
        "config_kwargs": {"retries": {"total_max_attempts": 1}, "read_timeout": 0.5,
                          "connect_timeout": 2},
        "skip_instance_cache": True,
    }  # fmt: skip


@pytest.fixture
def remote(servers, kit, request, monkeypatch):
    """A two-shard store on moto; returns (url, proxy options, faults)."""
    direct, through_proxy, proxy = servers
    monkeypatch.setattr(_remote, "RETRY_DELAYS", (0.01, 0.02, 0.04))
    codec = kit.make_codec("topk")
    url = f"s3://{BUCKET}/{request.node.name.replace('[', '-').rstrip(']')}"
    import s3fs

    fs = s3fs.S3FileSystem(**options(direct))
    if not fs.exists(BUCKET):
        fs.mkdir(BUCKET)
    shards = [kit.make_documents(codec, 3, seed) for seed in range(2)]
    kit.write_store(url, codec, "parquet", shards, storage_options=options(direct))
    faults = Faults()
    proxy.faults = faults
    return url, options(through_proxy), faults


def opened(url: str, opts: dict):
    store = open_store(url, storage_options=opts, readahead=0)
    store.fs.retries = 1  # s3fs's own retry loop: one attempt
    return store


@pytest.mark.parametrize("mode", ["503", "reset", "stall"])
def test_a_transient_fault_is_retried_and_the_read_succeeds(remote, mode):
    url, opts, faults = remote
    faults.add("shards/000000", mode, times=2)
    docs = opened(url, opts).read_shard(0)
    assert len(docs) == 3
    assert faults.count("shards/000000") == 3  # two faults, then the read that passed


@pytest.mark.parametrize("mode", ["503", "reset", "stall"])
def test_a_lasting_fault_is_a_network_error_naming_the_url(remote, mode):
    url, opts, faults = remote
    faults.add("shards/000000", mode)
    store = opened(url, opts)
    with pytest.raises(StoreReadError, match="after 4 attempts") as info:
        store.read_shard(0)
    assert f"{url}/shards/000000.parquet" in str(info.value)
    assert "missing" not in str(info.value)
    assert faults.count("shards/000000") >= 4  # a reset may be retried once below us too
    problems = store.verify()  # the other shard still reads; this one is named, not missing
    assert len(problems) == 1 and "cannot read" in problems[0], problems


def test_access_denied_is_not_retried_and_not_missing(remote):
    url, opts, faults = remote
    faults.add("shards/000001", "403")
    with pytest.raises(StoreReadError, match="PermissionError"):
        opened(url, opts).read_shard(1)
    assert faults.count("shards/000001") == 1


def test_only_a_missing_object_is_reported_missing(remote, servers):
    import s3fs

    url, opts, faults = remote
    s3fs.S3FileSystem(**options(servers[0])).rm(f"{url}/shards/000001.parquet")
    with pytest.raises(CorruptShardError, match="missing") as info:
        opened(url, opts).read_shard(1)
    assert not isinstance(info.value, StoreReadError)
    assert faults.count("shards/000001") <= 1  # not retried (s3fs may know it from a HEAD)


def test_the_manifest_read_is_retried_too(remote):
    url, opts, faults = remote
    faults.add("manifest.json", "503", times=2)
    assert opened(url, opts).num_shards == 2
    faults.add("manifest.json", "503")
    with pytest.raises(StoreReadError, match="manifest.json"):
        opened(url, opts)


def test_an_object_larger_than_the_manifest_says_is_not_downloaded_whole(remote, servers):
    # The manifest bounds each file's size; an object grown past it (64 MiB here) is read up
    # to one byte past that size, a ranged request, and refused, not fetched whole.
    import s3fs

    url, opts, faults = remote
    fs = s3fs.S3FileSystem(**options(servers[0]))
    path = f"{url}/shards/000001.parquet"
    declared = len(fs.cat(path))
    fs.pipe(path, fs.cat(path) + bytes(64 * 2**20))
    with pytest.raises(CorruptShardError, match=f"has more than {declared} bytes, the manifest"):
        opened(url, opts).read_shard(1)
    assert 0 < faults.sent[path.removeprefix("s3:/")] <= declared + 1
