"""The ``logitstore`` command: one click group, one module per subcommand.

Library errors are caught here, once, and turned into a message and a non-zero exit.
"""

from __future__ import annotations

import sys

import click

from logitstore import __version__
from logitstore.errors import LogitstoreError


class _Group(click.Group):
    def invoke(self, ctx: click.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except LogitstoreError as exc:
            # One line, whatever the message holds (it may quote a stranger's store).
            click.echo(f"error: {' '.join(str(exc).split())}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            # What was committed (shards, checkpoints) stays; say how to continue from it.
            command = self.get_command(ctx, ctx.invoked_subcommand or "")
            resumable = command is not None and any(p.name == "resume" for p in command.params)
            hint = "; rerun the same command with --resume to continue" if resumable else ""
            click.echo(f"\ninterrupted: the work committed so far is kept{hint}", err=True)
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="logitstore")
def main() -> None:
    """Precompute a teacher's logits once, store them compressed, train many students.

    \b
    Examples:
      logitstore teacher-pass --teacher HuggingFaceTB/SmolLM2-135M-Instruct \\
          --data corpus.jsonl --out store/
      logitstore inspect store/
      logitstore train --store store/ --student config.json --divergence drkl --out run/
    """


# Subcommands, one module each, each defining a click command named `command`.
# Register with two lines per module, e.g.:
#   from cli import inspect as _inspect  # noqa: E402
#   main.add_command(_inspect.command)
# --- subcommands (keep sorted) ---
from logitstore.cli import bench as _bench  # noqa: E402

main.add_command(_bench.command)
from logitstore.cli import convert as _convert  # noqa: E402

main.add_command(_convert.command)
from logitstore.cli import eval as _eval  # noqa: E402

main.add_command(_eval.command)
from logitstore.cli import export as _export  # noqa: E402

main.add_command(_export.command)
from logitstore.cli import inspect as _inspect  # noqa: E402

main.add_command(_inspect.command)
from logitstore.cli import mix as _mix  # noqa: E402

main.add_command(_mix.command)
from logitstore.cli import push as _push  # noqa: E402

main.add_command(_push.command)
from logitstore.cli import teacher_pass as _teacher_pass  # noqa: E402

main.add_command(_teacher_pass.command)  # type: ignore[has-type]  # mypy loses the long decorator chain
from logitstore.cli import train as _train  # noqa: E402

main.add_command(_train.command)
from logitstore.cli import verify as _verify  # noqa: E402

main.add_command(_verify.command)
# --- end subcommands ---


if __name__ == "__main__":  # pragma: no cover
    main()
