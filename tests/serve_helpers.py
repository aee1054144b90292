"""Shared by the `vpgtrans serve` tests: a tiny chat model, a live server on loopback, raw HTTP requests."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest

MINIGPT4 = {"text": "###Human: <Img><ImageHere></Img> {instruction} ###Assistant: ", "end": "###"}
CLI = [sys.executable, "-c", "import sys; from vpgtrans.cli import main; sys.exit(main())"]


def require_serve_extra(*extra: str) -> None:
    """Skip (with the install command as the reason) when the serve extra or a test client is missing."""
    for module in ("fastapi", "uvicorn", "openai", *extra):
        pytest.importorskip(module, reason=f"{module} is not installed: pip install -e '.[serve,dev]'")


def make_model(tiny_paths: dict, out: Path) -> Path:
    """A tiny Q-Former × OPT model with the MiniGPT-4 template (multi-turn capable), written with save_model."""
    import torch

    from vpgtrans.checkpoint import save_model
    from vpgtrans.model import build_model
    from vpgtrans.testing import tiny_spec

    torch.manual_seed(0)
    spec = tiny_spec(tiny_paths, llm="opt")
    spec["template"] = MINIGPT4
    return save_model(build_model(spec), out)


def png_bytes(image: Any) -> bytes:
    """PNG file bytes of a PIL image."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    """A base64 data: URL."""
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def user_turn(text: str, url: str | None = None) -> dict:
    """A user message, with the image first when given (the page and most clients send it that way)."""
    if url is None:
        return {"role": "user", "content": text}
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                        {"type": "text", "text": text}]}


@contextlib.contextmanager
def live_server(model_dir: Path, *args: str, timeout: float = 180) -> Iterator[tuple[str, list[str]]]:
    """Run `vpgtrans serve` on a free loopback port; yields (base URL, its stderr lines so far and to come)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.Popen([*CLI, "serve", "--model", str(model_dir), "--port", "0", "--device", "cpu", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + timeout
        url = None
        while url is None:
            found = [m for m in (re.search(r"at (http://\S+?)/ ", line) for line in lines) if m]
            if found:
                url = found[0].group(1)
            elif proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"server did not start (exit {proc.poll()}): {''.join(lines)}")
            else:
                time.sleep(0.1)
        while request("GET", url + "/health")[0] != 200:
            assert time.monotonic() < deadline and proc.poll() is None, "".join(lines)
            time.sleep(0.1)
        yield url, lines
        assert proc.poll() is None, "the server died: " + "".join(lines)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def request(method: str, url: str, body: bytes | dict | None = None,
            headers: dict[str, str] | None = None, timeout: float = 120) -> tuple[int, Any]:
    """(status, parsed JSON body or text); connection failures come back as status 0."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    except (urllib.error.URLError, ConnectionError):
        return 0, None
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")
