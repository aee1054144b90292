"""The `vpgtrans` command line: one click group, one module per command."""

from __future__ import annotations

import os
import sys
import traceback

import click

from ..errors import VpgtransError, translate
from ..threads import pin_cpu_numerics

# Before anything loads torch (its CPU kernels and OpenMP read these once): the same figures on every AVX2 CPU,
# and threads that sleep rather than spin when another job takes a core.
pin_cpu_numerics()


class _UsageLine(click.ClickException):
    """A click usage error shown as the project's one line instead of usage + hint + error."""

    exit_code = 2

    def __init__(self, exc: click.UsageError):
        where = exc.ctx.command_path if exc.ctx is not None else "vpgtrans"
        super().__init__(f"{exc.format_message().rstrip('.')} — see `{where} --help`")

    def show(self, file: object = None) -> None:
        """Print `error: …` on stderr."""
        click.echo(f"error: {_one_line(self.message)}", err=True)


def _one_line(text: object) -> str:
    return " ".join(str(text).split("\n")).strip()


def _fail(ctx: click.Context, exc: VpgtransError) -> None:
    if _debug(ctx):
        traceback.print_exc()
    click.echo(f"error: {_one_line(exc)}", err=True)
    sys.exit(exc.exit_code)


class _Group(click.Group):
    """Turns VpgtransError, file/format failures (errors.translate) and crashes into one line unless --debug."""

    def make_context(self, *args, **kwargs):  # type: ignore[override]
        try:
            return super().make_context(*args, **kwargs)
        except click.UsageError as exc:
            raise _UsageLine(exc) from None

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except VpgtransError as exc:
            _fail(ctx, exc)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except click.UsageError as exc:
            raise _UsageLine(exc) from None
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort, SystemExit):
            raise
        except Exception as exc:  # noqa: BLE001 - last line of defence for the user
            known = translate(exc)
            if known is not None:
                _fail(ctx, known)
            if _debug(ctx):
                traceback.print_exc()
            else:
                click.echo(f"error: {type(exc).__name__}: {_one_line(exc)} (rerun with --debug for the traceback)",
                           err=True)
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
    from ..trust import allow_remote_code

    allow_remote_code(trust_remote_code)
    # The opt-in is for this invocation only (matters when main() runs several times in one process).
    click.get_current_context().call_on_close(lambda: allow_remote_code(False))
    if trust_remote_code:
        click.echo("warning: --trust-remote-code: code shipped with the models this command loads may run; "
                   "each file is named before it is imported", err=True)

    if not debug:
        import warnings

        # Library warnings (torch, transformers) would precede our own one-line messages; --debug shows them.
        for category in (UserWarning, FutureWarning, DeprecationWarning):
            warnings.filterwarnings("ignore", category=category)
    # Weight-loading progress bars from transformers drown our own progress output. Importing transformers
    # here would cost a second even for `components` and `--help`: when it is not loaded yet, its defaults are
    # set through the environment it reads on import.
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    else:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _add_commands() -> None:
    # why local: the commands are added once `main` exists (their modules stay free of the group itself)
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
