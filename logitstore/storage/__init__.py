"""Storage backends: how a shard's arrays become files (Zarr v3 or Parquet), and fsspec utilities.

``convert_store`` (in :mod:`logitstore.storage.convert`, exported from ``logitstore``) converts
between backends. Add a backend by subclassing :class:`Backend` and adding one line to ``BACKENDS``.
"""

from __future__ import annotations

from logitstore.registry import Registry
from logitstore.storage._parquet import ParquetBackend
from logitstore.storage._zarr import ZarrBackend
from logitstore.storage.base import Backend, ShardArrays, token_dtype

BACKENDS: Registry[Backend] = Registry(
    "backend",
    {
        "parquet": ParquetBackend(),
        "zarr": ZarrBackend(),
    },
)


def get_backend(name: str) -> Backend:
    """The backend registered as ``name``; ``UnknownNameError`` lists the known ones."""
    return BACKENDS[name]


__all__ = [
    "BACKENDS",
    "Backend",
    "ParquetBackend",
    "ShardArrays",
    "ZarrBackend",
    "get_backend",
    "token_dtype",
]
