"""The same writer and reader against a real S3-compatible server (moto) on 127.0.0.1."""

from __future__ import annotations

import pytest

from logitstore import StoreWriter, open_store
from logitstore.errors import ShardClaimError

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def s3():
    moto_server = pytest.importorskip("moto.server")
    s3fs = pytest.importorskip("s3fs")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    opts = {"client_kwargs": {"endpoint_url": f"http://{host}:{port}"}, "key": "k", "secret": "s"}
    fs = s3fs.S3FileSystem(**opts)
    fs.mkdir("store-tests")
    yield fs, opts
    server.stop()


@pytest.mark.parametrize("backend", ["zarr", "parquet"])
def test_write_read_verify_on_s3(s3, kit, backend):
    fs, opts = s3
    codec = kit.make_codec("topk")
    shards = [kit.make_documents(codec, 3, seed) for seed in range(2)]
    url = f"s3://store-tests/{backend}"
    args = dict(codec=codec, backend=backend, metadata=kit.METADATA, vocab_size=kit.VOCAB)
    a = StoreWriter(url, storage_options=opts, **args)
    b = StoreWriter(url, mode="join", storage_options=opts, **args)
    a.write_shard(0, shards[0])
    with pytest.raises(ShardClaimError, match="already committed"):
        b.write_shard(0, shards[0])
    b.write_shard(1, shards[1])
    a.finalize(2)
    store = open_store(url, storage_options=opts)
    expected = [d for s in shards for d in s]
    assert [d.doc_id for d in store.iter_documents()] == [d.doc_id for d in expected]
    assert store.verify() == []
    assert not [p for p in fs.find(url) if "/claims/" in p or ".tmp-" in p]
    shard = f"store-tests/{backend}/shards/000001{'.zarr' if backend == 'zarr' else '.parquet'}"
    fs.rm(shard, recursive=True)
    problems = open_store(url, storage_options=opts).verify()
    assert len(problems) == 1 and "shards/000001" in problems[0]
