"""The manifest's schema: every field a reader uses, with its type and range, and the bounds
on what a manifest may declare. ``logitstore.format`` re-exports every public name."""

from __future__ import annotations

from logitstore._schema import Int, List, Nullable, Num, Obj, Pair, Str

LEGACY_TEMPERATURES_KEY = "temperatures"
"""Where format version 1 kept the tail temperatures: ``capture.temperatures``."""

# -- the manifest's schema -----------------------------------------------------------------
# Every field a reader uses, with its type and range, checked once when a store is opened, so
# a malformed manifest (a stranger's bytes) is refused with a ManifestError naming the field,
# never an OverflowError or TypeError later. Keys not listed are allowed (optional keys are a
# compatible change) but carry no meaning.

MAX_COUNT = 2**40
"""Largest count or byte size a shard may declare (documents, tokens, positions, bytes)."""

MAX_VOCAB_SIZE = 2**24
"""Largest vocabulary a store may declare (three id planes; real vocabularies are < 2^19)."""

MAX_TEMPERATURES = 64
MAX_SHARDS = 2**20
MAX_FILES_PER_SHARD = 4096

MAX_EXPANSION = 256
"""A shard's arrays, uncompressed, may be at most this many times its bytes on disk: what the
manifest declares and what the backends decode alike.

Real shards compress 2-4x; the bound keeps a small hostile shard (millions of declared
positions, chunks left out as all fill value, a zstd bomb) from making a reader allocate
gigabytes before finding it empty or broken."""

MAX_READ_EXPANSION = 4 * MAX_EXPANSION
"""A shard's arrays with its positions as a reader decodes them (``Codec.decoded_bytes``) may
be at most this many times its bytes on disk.

Decoding expands: the dense codec's one-byte codes become an int64 id and a float32 log-prob
each, so a real dense store reads to 30 (8 bits) or 240 (4 bits) times its bytes on disk and a
top-k store to about 10. A writer stores a shard whose data compresses so well that it would
exceed either bound (long repeats of one text) without compression, so every store it writes
can be read."""


_COUNT = Int(0, MAX_COUNT)
_SOME = Int(1, MAX_COUNT)  # a shard holds at least one document, of at least one token
_FIDELITY = Nullable(Obj(values=Num()))
_TEMPERATURES = List(
    Num(positive=True),
    MAX_TEMPERATURES,
    f"a list of at most {MAX_TEMPERATURES} distinct finite numbers > 0",
    unique=True,
)

SHARD_SCHEMA = Obj(
    required={
        "path": Str(),
        "documents": _SOME,
        "tokens": _SOME,
        "positions": _COUNT,
        "bytes": _COUNT,
        "sha256": Str(r"[0-9a-f]{64}", "a SHA-256 hex digest"),
        "files": List(Pair(Str(), _COUNT), MAX_FILES_PER_SHARD, "a list of [name, size] pairs"),
    },
    optional={"index": Int(0, MAX_SHARDS), "fidelity": _FIDELITY},
)

RECORD_SCHEMA = Obj(
    required={**SHARD_SCHEMA.required, "num_temperatures": Int(0, MAX_TEMPERATURES)},
    optional=SHARD_SCHEMA.optional,
)
"""A shard's commit record (``records/<i>.json``): its manifest entry plus ``num_temperatures``."""

MANIFEST_SCHEMA = Obj(
    required={
        "format_version": Int(0, 2**31),
        "codec": Obj(
            required={"name": Str(), "version": Int(0, 2**31)},
            optional={"configuration": Obj()},
        ),
        "backend": Str(),
        "vocab_size": Int(1, MAX_VOCAB_SIZE),
        "num_temperatures": Int(0, MAX_TEMPERATURES),
        "tail_temperatures": _TEMPERATURES,
        "teacher": Obj(),
        "tokenizer": Obj(),
        "capture": Obj(),
        "source": Obj(),
        "shards": List(SHARD_SCHEMA, MAX_SHARDS, f"a list of at most {MAX_SHARDS} shards"),
        "statistics": Obj(
            required={
                "documents": _COUNT,
                "tokens": _COUNT,
                "positions": _COUNT,
                "bytes": _COUNT,
                "bytes_per_token": Num(),
                "bytes_per_position": Num(),
            },
            optional={"fidelity": _FIDELITY},
        ),
    },
    optional={"compression_level": Int(-7, 22), "run": Obj()},
)
"""The manifest of the current format version."""

MANIFEST_SCHEMA_V1 = Obj(
    required={
        **{k: v for k, v in MANIFEST_SCHEMA.required.items() if k != "tail_temperatures"},
        "capture": Obj(optional={LEGACY_TEMPERATURES_KEY: _TEMPERATURES}),
    },
    optional=MANIFEST_SCHEMA.optional,
)
"""Format version 1: no ``tail_temperatures``; ``capture.temperatures`` optional."""


MANIFEST_FIELDS = tuple(MANIFEST_SCHEMA.required)
"""Top-level fields every manifest has."""

SHARD_FIELDS = tuple(SHARD_SCHEMA.required)
"""Fields every shard entry (and record) has."""
