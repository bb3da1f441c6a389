"""``logitstore inspect``: what a store holds, from its manifest."""

from __future__ import annotations

import json

import click

from logitstore.cli._options import storage_options as _storage_options


def _short(value: object) -> str:
    """A setting for one line: long lists (e.g. a fitted id order) are summarised."""
    if isinstance(value, list) and len(value) > 8:
        return f"[{len(value)} values]"
    if isinstance(value, list):  # e.g. a mixture's stores, each with its codec's settings
        return "[" + ", ".join(_short(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_short(v)}" for k, v in sorted(value.items())) + "}"
    return str(value)


def _temperatures(extra: list[float] | None) -> str:
    """The capture temperature (1) and those of the extra tail columns, in column order."""
    if extra is None:
        return "1, tail columns at unlisted temperatures (format 1)"
    return "1" + (f", tail columns at {', '.join(f'{t:g}' for t in extra)}" if extra else "")


def _codec(codec: dict) -> str:
    config = sorted(codec.get("configuration", {}).items())
    params = ", ".join(f"{k}={_short(v)}" for k, v in config)
    return f"{codec['name']} v{codec['version']} ({params})"


@click.command("inspect")
@click.argument("store")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@_storage_options()
def command(store: str, as_json: bool, storage_options: dict | None) -> None:
    """Documents, tokens, bytes per token, codec, teacher and capture-time fidelity of STORE.

    STORE is a local path or an fsspec URL (memory://, s3://, hf://).

    \b
    Examples:
      logitstore inspect store/
      logitstore inspect s3://bucket/stores/smollm2 --json
    """
    from logitstore import open_store
    from logitstore.storage._remote import printable

    summary = open_store(store, storage_options).summary()
    if as_json:
        click.echo(json.dumps(summary, indent=2, sort_keys=True))
        return
    teacher = summary["teacher"]
    rows = [
        ("store", summary["url"]),
        ("format", f"v{summary['format_version']}, backend {summary['backend']}"),
        ("codec", _codec(summary["codec"])),
        ("vocabulary", summary["vocab_size"]),
        ("temperatures", _temperatures(summary["tail_temperatures"])),
        ("shards", summary["shards"]),
        ("documents", summary["documents"]),
        ("tokens", summary["tokens"]),
        ("bytes", summary["bytes"]),
        ("bytes/token", f"{summary['bytes_per_token']:.2f}"),
        ("teacher", ", ".join(f"{k}={_short(v)}" for k, v in sorted(teacher.items())) or "-"),
    ]
    fidelity = summary["fidelity"] or {}
    rows += [(f"fidelity {k}", f"{v:.6g}") for k, v in sorted(fidelity.items())]
    if not fidelity:
        rows.append(("fidelity", "not measured"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        # the teacher's metadata is the store's text: an escape sequence is shown, not obeyed
        click.echo(printable(f"{key:<{width}}  {value}"))
