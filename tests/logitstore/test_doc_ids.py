"""Ids held by more than one shard, found from hashes (``logitstore/_doc_ids.py``), checked
against a plain count of the ids, also when every id's hash collides."""

from __future__ import annotations

import random

import pytest

from logitstore import _doc_ids
from logitstore._doc_ids import IdLedger, Repeat


def by_counting(shards: list[list[str]]) -> dict[int, Repeat]:
    first: dict[str, int] = {}
    out: dict[int, Repeat] = {}
    for j, ids in enumerate(shards):
        earlier = [d for d in dict.fromkeys(ids) if first.setdefault(d, j) != j]
        if earlier:
            out[j] = Repeat(earlier[0], first[earlier[0]], len(earlier))
    return out


@pytest.mark.parametrize("collide", [False, True])
@pytest.mark.parametrize("seed", range(5))
def test_repeats_equal_a_plain_count_of_the_ids(seed, collide, monkeypatch):
    if collide:  # every id hashes alike: only the ids' text may decide
        monkeypatch.setattr(_doc_ids, "hash", lambda text: 7, raising=False)
    rng = random.Random(seed)
    pool = [f"doc-{i}" for i in range(40)]
    shards = [[rng.choice(pool) for _ in range(rng.randint(0, 12))] for _ in range(6)]
    ledger = IdLedger()
    for j, ids in enumerate(shards):
        ledger.add(j, ids)
    assert ledger.repeats(lambda j: shards[j]) == by_counting(shards)


def test_no_repeat_reads_no_shard_again():
    ledger = IdLedger()
    for j in range(3):
        ledger.add(j, [f"{j}/{d}" for d in range(5)])
    assert ledger.repeats(lambda j: pytest.fail(f"shard {j} read again")) == {}


def test_a_shard_that_no_longer_reads_is_left_out():
    ledger = IdLedger()
    for j, ids in enumerate([["a", "b"], ["b"], ["a"]]):
        ledger.add(j, ids)
    got = ledger.repeats(lambda j: None if j == 1 else [["a", "b"], ["b"], ["a"]][j])
    assert got == {2: Repeat("a", 0, 1)}
