"""`vpgtrans serve`: the model behind an OpenAI-compatible HTTP API and a chat page (`pip install vpgtrans[serve]`)."""

from __future__ import annotations

import socket

import click

from ..errors import ConfigError
# why project modules are imported inside the commands: `vpgtrans --help` must not import torch or transformers

_PUBLIC = ("0.0.0.0", "::", "")


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket, so a taken port is a one-line error before the model loads."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror})",
                          "pick another --port, or stop what is using it") from None
    sock.listen(128)
    return sock


@click.command()
@click.option("--model", "model_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="A vpgtrans model directory.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0 exposes the server to the network: no authentication!).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="0 = any free port.")
@click.option("--name", "model_id", default=None, help="Model id clients pass as `model` (default: directory name).")
@click.option("--device", default="auto", show_default=True,
              help="cpu, cuda, cuda:1, ... (auto = cuda when available).")
@click.option("--max-tokens", default=256, show_default=True, type=click.IntRange(1),
              help="New tokens when a request gives no max_tokens.")
@click.option("--max-batch", default=8, show_default=True, type=click.IntRange(1),
              help="Requests with the same sampling settings decoded together.")
@click.option("--max-queue", default=64, show_default=True, type=click.IntRange(1),
              help="Requests waiting beyond this get HTTP 429.")
@click.option("--max-context", default=None, type=click.IntRange(16),
              help="Cap on prompt + answer tokens (default: the LLM's max_position_embeddings).")
@click.option("--max-body-mb", default=20.0, show_default=True, type=click.FloatRange(0.01),
              help="Largest request body accepted (HTTP 413 beyond).")
@click.option("--max-image-pixels", default=25_000_000, show_default=True, type=click.IntRange(1),
              help="Largest image (width x height) decoded; bigger ones are refused before decoding.")
def serve(model_dir: str, host: str, port: int, model_id: str | None, device: str, max_tokens: int, max_batch: int,
          max_queue: int, max_context: int | None, max_body_mb: float, max_image_pixels: int) -> None:
    """Serve the model: OpenAI-compatible /v1/chat/completions, /v1/models, /health, and a chat page at /."""
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as exc:
        raise ConfigError(f"vpgtrans serve needs the 'serve' extra ({exc.name} is not installed)",
                          "pip install 'vpgtrans[serve]'") from None
    from ..serve.app import app_for_model_dir

    if host in _PUBLIC:
        click.echo(f"warning: --host {host or '(all)'} listens on every network interface; this server has no "
                   "authentication: anyone who can reach this machine can use the model", err=True)
    sock = _bind(host, port)
    app, engine, model_id = app_for_model_dir(
        model_dir, device=device, model_id=model_id, max_batch=max_batch, max_queue=max_queue, max_tokens=max_tokens,
        context=max_context, max_body_bytes=int(max_body_mb * (1 << 20)), max_image_pixels=max_image_pixels)
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    click.echo(f"serving {model_id} at http://{shown}:{bound_port}/ (OpenAI base URL http://{shown}:{bound_port}/v1;"
               f" context {engine.context} tokens, {engine.soft_prompts} image soft prompts) — Ctrl-C stops",
               err=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])
