"""The dataset card of a Hub export, built with ``huggingface_hub``'s ``DatasetCard``.

The card's metadata (YAML front matter) is a :class:`huggingface_hub.DatasetCardData`: the
license, a pretty name, the task category, the Hub's size bucket of the document count, the
source dataset and the teacher as ``base_model`` when they are Hub repositories, the tags, and
the two configs with the decoded view's features (written by ``datasets``' own
``MetadataConfigs`` and ``DatasetInfosDict``, as ``Dataset.push_to_hub`` writes them). The body
says what the store is, how it was captured and how to load it. The codec is summarised in
words and numbers; fitted tables such as ``hot_ids`` (thousands of ids) stay in
``manifest.json`` and are only counted here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from logitstore import format as fmt

if TYPE_CHECKING:  # imported when a card is made: `import logitstore` stays light
    from huggingface_hub import DatasetCard, DatasetCardData

VIEW_DIR = "data"
TAGS = ["knowledge-distillation", "teacher-logits", "logitstore"]
TASK_CATEGORIES = ["text-generation"]
SIZE_CATEGORIES = (
    (10**3, "n<1K"),
    (10**4, "1K<n<10K"),
    (10**5, "10K<n<100K"),
    (10**6, "100K<n<1M"),
    (10**7, "1M<n<10M"),
    (10**8, "10M<n<100M"),
    (10**9, "100M<n<1B"),
    (10**10, "1B<n<10B"),
    (10**11, "10B<n<100B"),
    (10**12, "100B<n<1T"),
)
"""The Hub's size buckets: ``(upper bound, name)``; ``n>1T`` above the last."""

QUANTIZED = {"q8": 8, "q6": 6, "q4": 4}


def size_category(n: int) -> str:
    """The Hub's ``size_categories`` bucket of ``n`` examples, e.g. ``1K<n<10K`` for 1500."""
    for bound, name in SIZE_CATEGORIES:
        if n < bound:
            return name
    return "n>1T"


def _hub_id(name: Any) -> str | None:
    """``name`` when it is a valid Hub repository id, else None."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(name, str) or not name:
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def _mixed_teachers(mixture: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The teacher section of each store of a mixture (``teacher.mixture.stores``).

    The manifest's metadata sections are the store's own JSON, checked by no schema: a
    ``stores`` that is not a list counts as none, and an entry or teacher that is not an
    object as a teacher of no known name.
    """
    stores = mixture.get("stores")
    if not isinstance(stores, list):
        return []
    teachers = [s.get("teacher") if isinstance(s, Mapping) else None for s in stores]
    return [t if isinstance(t, Mapping) else {} for t in teachers]


def base_models(teacher: Mapping[str, Any]) -> list[str]:
    """The Hub ids of the teacher (each teacher of a mixture); local teachers are left out.

    A teacher loaded from a local folder carries its weights' fingerprint (``weights``), and its
    ``id`` is only the folder's name, so it names no Hub model.
    """
    mixture = teacher.get("mixture")
    if isinstance(mixture, Mapping):
        found = [base_models(t) for t in _mixed_teachers(mixture)]
        return list(dict.fromkeys(m for ms in found for m in ms))
    if teacher.get("weights"):
        return []
    name = _hub_id(teacher.get("id") or teacher.get("model"))
    return [name] if name else []


def source_datasets(source: Mapping[str, Any]) -> list[str]:
    """The Hub dataset the store was computed from, if it was one (``kind == "hub"``)."""
    name = _hub_id(source.get("name")) if source.get("kind") == "hub" else None
    return [name] if name else []


def _short(name: str) -> str:
    return name.rstrip("/").rsplit("/", 1)[-1]


def pretty_name(manifest: Mapping[str, Any]) -> str:
    """E.g. ``"SmolLM2-135M-Instruct teacher logits on smoltalk"``."""
    teacher = manifest["teacher"]
    mixture = teacher.get("mixture")
    if isinstance(mixture, Mapping):
        what = f"Mixed logits of {len(_mixed_teachers(mixture))} teachers"
    else:
        what = (
            _short(str(teacher.get("model") or teacher.get("id") or "teacher")) + " teacher logits"
        )
    source = manifest.get("source", {}).get("name")
    return what + (f" on {_short(str(source))}" if source else "")


def card_data(
    manifest: Mapping[str, Any],
    schema: pa.Schema,
    *,
    license: str | None = None,
    num_bytes: int = 0,
) -> DatasetCardData:
    """The card's metadata.

    Args:
        manifest: the exported store's manifest.
        schema: the decoded view's Arrow schema (for ``dataset_info.features``).
        license: a Hub license identifier (``apache-2.0``, ``mit``, ``other``, ...), or None.
        num_bytes: the view's size in memory (Arrow bytes), for ``dataset_info``.
    """
    import datasets
    from datasets.info import DatasetInfosDict
    from datasets.utils.metadata import MetadataConfigs
    from huggingface_hub import DatasetCardData

    documents = int(manifest["statistics"]["documents"])
    data = DatasetCardData(
        license=license,
        pretty_name=pretty_name(manifest),
        task_categories=list(TASK_CATEGORIES),
        size_categories=[size_category(documents)],
        source_datasets=source_datasets(manifest.get("source", {})) or None,
        base_model=base_models(manifest["teacher"]) or None,
        tags=list(TAGS),
    )
    MetadataConfigs(
        {
            "default": {
                "data_files": [{"split": "train", "path": f"{VIEW_DIR}/*.parquet"}],
                "default": True,
            },
            "encoded": {"data_files": [{"split": "train", "path": f"{fmt.SHARDS_DIR}/*.parquet"}]},
        }
    ).to_dataset_card_data(data)
    splits = datasets.SplitDict()
    splits.add(datasets.SplitInfo(name="train", num_bytes=num_bytes, num_examples=documents))
    info = datasets.DatasetInfo(
        features=datasets.Features.from_arrow_schema(schema),
        splits=splits,
        dataset_size=num_bytes,
    )
    DatasetInfosDict({"default": info}).to_dataset_card_data(data)
    return data


# -- the body --------------------------------------------------------------------------------


def _row(key: str, value: Any) -> str:
    return f"| {key} | {value} |"


def _plain(value: Any) -> str:
    """A setting for a table cell: scalars as they are, long lists and tables only counted."""
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {_plain(v)}" for k, v in sorted(value.items())) + "}"
    if isinstance(value, (list, tuple)):
        if len(value) > 8 or any(isinstance(v, (list, tuple, Mapping)) for v in value):
            return f"[{len(value):,} values]"
        return "[" + ", ".join(_plain(v) for v in value) + "]"
    return str(value)


def _settings(section: Mapping[str, Any], skip: tuple[str, ...] = ()) -> str:
    return ", ".join(f"`{k}={_plain(v)}`" for k, v in sorted(section.items()) if k not in skip)


def _temperatures(manifest: Mapping[str, Any]) -> str:
    """Every temperature the store holds the tail at: 1 always, then the extra ones in order."""
    from logitstore.format import tail_temperatures

    extra = tail_temperatures(manifest)
    if extra is None:
        return "1 and unlisted others (a format 1 store)"
    return ", ".join(_plain(t) for t in [1.0, *extra])


def _codec_words(name: str) -> str:
    """The first line of the codec class's docstring: what the codec keeps, in words."""
    from logitstore.codecs import CODECS

    try:
        doc = CODECS[name].__doc__ or ""
    except KeyError:
        return "a codec this version of logitstore does not know"
    return doc.strip().splitlines()[0].replace("``", "`").rstrip(".")


def _precision(config: Mapping[str, Any]) -> str:
    """The value precision of a codec configuration, in words."""
    values = config.get("values")
    if "bits" in config:
        values = f"q{config['bits']}"
    if values in QUANTIZED:
        return (
            f"`{values}`: {QUANTIZED[values]}-bit codes of each log-prob's distance below the "
            "top-1, which is stored exactly"
        )
    if isinstance(values, str):
        return f"`{values}` distances below the top-1, which is stored exactly"
    return "exact float32 log-probs"


def codec_rows(manifest: Mapping[str, Any]) -> list[str]:
    """Table rows summarising the codec: words, settings, precision, fitted tables by size."""
    codec = manifest["codec"]
    config = codec.get("configuration", {})
    tables = {k: v for k, v in config.items() if isinstance(v, (list, tuple, Mapping))}
    scalars = {k: v for k, v in config.items() if k not in tables}
    rows = [
        _row("codec", f"`{codec['name']}` v{codec['version']}: {_codec_words(codec['name'])}"),
        _row("codec settings", _settings(scalars) or "none"),
        _row("value precision", _precision(scalars)),
    ]
    rows += [
        _row(f"fitted table `{k}`", f"{len(v):,} entries (in `manifest.json`)")
        for k, v in sorted(tables.items())
    ]
    return rows


def _source_row(source: Mapping[str, Any]) -> str:
    return _row("source", _settings(source, skip=("fingerprint",)) or "not recorded")


def _mixture_note(teacher: Mapping[str, Any]) -> str:
    mixture = teacher.get("mixture")
    if not isinstance(mixture, Mapping):
        return ""
    names = [t.get("model") or t.get("id") for t in _mixed_teachers(mixture)]
    return (
        "\n## Mixture of teachers\n\n"
        f"{mixture.get('approximation', '')}\n\nWeights: `{_plain(mixture.get('weights'))}`; "
        f"teachers: `{names}`.\n"
    )


def card_body(
    manifest: Mapping[str, Any],
    *,
    repo_id: str | None = None,
    max_support: int | None = None,
) -> str:
    """The card's Markdown body (see :func:`dataset_card`)."""
    repo = repo_id or "ORG/NAME"
    stats = manifest["statistics"]
    teacher, tokenizer = manifest["teacher"], manifest["tokenizer"]
    model = teacher.get("model") or teacher.get("id") or teacher.get("name") or "unknown"
    rows = [
        _row("teacher", _settings(teacher, skip=("mixture",))),
        _row(
            "tokenizer",
            _settings({k: v for k, v in tokenizer.items() if not isinstance(v, (dict, list))}),
        ),
        _row("vocabulary", manifest["vocab_size"]),
        *codec_rows(manifest),
        _row("capture", _settings(manifest["capture"])),
        _row("capture temperatures", _temperatures(manifest)),
        _source_row(manifest.get("source", {})),
        _row("documents", stats["documents"]),
        _row("tokens", stats["tokens"]),
        _row("shards", len(manifest["shards"])),
        _row("store bytes", stats["bytes"]),
        _row("bytes/token", f"{stats['bytes_per_token']:.2f}"),
    ]
    fidelity = stats.get("fidelity") or {}
    rows += [_row(f"fidelity: {k}", f"{v:.6g}") for k, v in sorted(fidelity.items())]
    if not fidelity:
        rows.append(_row("fidelity", "not measured at capture"))
    view_support = (
        f"the {max_support} most probable entries (the rest folded into `tail_logmass`)"
        if max_support
        else "the full stored support"
    )
    table = "\n".join(rows)
    return f"""
# Teacher logits of `{model}`

A cache of a teacher's next-token distributions for offline knowledge distillation, written
by logitstore (format version {manifest["format_version"]}; the layout is described in the
project's `FORMAT.md`). Precompute once, train many students: the teacher never runs again.

The card's `license` is the publisher's choice for this dataset; the teacher's license and the
source data's terms also apply to these outputs.

| | |
|---|---|
{table}

Fidelity is measured at capture time against the dense teacher on sampled positions
(`mass_captured`: teacher mass inside the stored support; `bucket_kl`: KL from the true to the
stored distribution on the bucket model; `top1_agreement`: stored argmax equals the true one).
{_mixture_note(teacher)}
## Train a student from it (one command)

```bash
logitstore train --store hf://datasets/{repo} --student STUDENT --divergence fkl --out run/
```

The student must use the teacher's tokenizer (checked against `tokenizer` above).

## Files

- `manifest.json`, `shards/*.parquet`: the logit store itself (parquet backend, codec-encoded
  columns, lossless). `logitstore.open_store("hf://datasets/{repo}")` streams it shard by
  shard; `logitstore verify` checks every checksum.
- `data/*.parquet`: a decoded, human-readable view, one row per document: `doc_id`,
  `source_row` and `window` (join with the source text by `source_row`), `input_ids`,
  `loss_mask`, `support_ids` and `support_logprobs` ({view_support}, most probable first,
  padding `-1` / `-inf`), `tail_logmass` (log of the teacher mass outside the support),
  `label_logprob`, `entropy`. Position `t` predicts `input_ids[t + 1]`.

```python
from datasets import load_dataset
rows = load_dataset("{repo}", split="train")           # the decoded view
from logitstore import open_store
store = open_store("hf://datasets/{repo}")             # the store
```
"""


def dataset_card(
    manifest: Mapping[str, Any],
    schema: pa.Schema,
    *,
    repo_id: str | None = None,
    max_support: int | None = None,
    num_bytes: int = 0,
    license: str | None = None,
) -> DatasetCard:
    """The export's ``README.md`` as a :class:`huggingface_hub.DatasetCard`.

    Args:
        manifest: the exported store's manifest.
        schema: the decoded view's Arrow schema (for ``dataset_info.features``).
        repo_id: ``ORG/NAME`` for the examples; a placeholder when ``None``.
        max_support: the view's support truncation, if any (stated in the card).
        num_bytes: the view's size in memory (Arrow bytes), for ``dataset_info.splits``.
        license: a Hub license identifier, or None (then ``push`` asks for one).

    Returns:
        The card; ``str(card)`` is the file's text.
    """
    from huggingface_hub import DatasetCard

    data = card_data(manifest, schema, license=license, num_bytes=num_bytes)
    body = card_body(manifest, repo_id=repo_id, max_support=max_support)
    return DatasetCard(f"---\n{data.to_yaml()}\n---\n{body}")
