"""logitstore: offline knowledge distillation with a compressed teacher-logit store."""

from __future__ import annotations

__version__ = "0.1.0"

from logitstore.dataset import StoreDataset  # noqa: E402
from logitstore.document import Document  # noqa: E402
from logitstore.hub import export_store, push_store  # noqa: E402
from logitstore.mixture import mix_stores  # noqa: E402
from logitstore.reader import LogitStore, open_store  # noqa: E402
from logitstore.storage.convert import convert_store  # noqa: E402
from logitstore.writer import EncodedDocument, StoreWriter  # noqa: E402

__all__ = [
    "Document",
    "EncodedDocument",
    "LogitStore",
    "StoreDataset",
    "StoreWriter",
    "__version__",
    "convert_store",
    "export_store",
    "mix_stores",
    "open_store",
    "push_store",
]
