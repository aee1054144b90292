"""The `vpgtrans` command line: one click group, one module per command."""

from __future__ import annotations

import os
import sys
import traceback

import click

from ..errors import VpgtransError


class _Group(click.Group):
    """Turns VpgtransError (and unexpected crashes) into one line on stderr unless --debug."""

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except VpgtransError as exc:
            if _debug(ctx):
                traceback.print_exc()
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort, SystemExit):
            raise
        except Exception as exc:  # noqa: BLE001 - last line of defence for the user
            if _debug(ctx):
                traceback.print_exc()
            else:
                click.echo(f"error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)", err=True)
            sys.exit(1)


def _debug(ctx: click.Context) -> bool:
    root = ctx.find_root()
    return bool(root.params.get("debug")) or os.environ.get("VPGTRANS_DEBUG") == "1"


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
@click.option("--trust-remote-code", is_flag=True,
              help="Let models loaded by this command run Python code shipped with them (auto_map). Off unless "
                   "given here: no manifest, recipe or config file can turn it on.")
@click.version_option(package_name="vpgtrans")
def main(debug: bool, trust_remote_code: bool) -> None:
    """vpgtrans: multimodal LLMs from frozen parts, and VPG transfer between LLMs."""
    from transformers.utils import logging as hf_logging

    from ..trust import allow_remote_code

    allow_remote_code(trust_remote_code)
    # The opt-in is for this invocation only (matters when main() runs several times in one process).
    click.get_current_context().call_on_close(lambda: allow_remote_code(False))
    if trust_remote_code:
        click.echo("warning: --trust-remote-code: code shipped with the models this command loads may run; "
                   "each file is named before it is imported", err=True)

    # Weight-loading progress bars from transformers drown our own progress output.
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _add_commands() -> None:
    from .chat import chat
    from .components import components
    from .demo import demo
    from .eval import eval_command
    from .export import export, import_cmd
    from .generate import generate
    from .plot import plot
    from .serve import serve
    from .surrogate import surrogate
    from .train import train
    from .transfer import transfer
    from .world import world

    for command in (demo, components, generate, eval_command, chat, export, import_cmd, plot, train, transfer, world,
                    surrogate, serve):
        main.add_command(command)


_add_commands()
