"""Load test for `vpgtrans serve`: N concurrent `openai` clients × M requests on loopback, latency percentiles.

    vpgtrans serve --model runs/src/model &
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --image a.png --image b.png \\
        --clients 16 --requests 10 --out benchmarks/results/serve_load.json

Every request is a greedy one-image question; the report has every answer, so a caller can check that batched
answers equal unbatched ones (tests/test_serve.py does).
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any


def _health(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url + "/health", timeout=30) as resp:
        return json.loads(resp.read())


def run(url: str, model: str, cases: list[tuple[str, str]], *, clients: int = 16, requests: int = 10,
        max_tokens: int = 8) -> dict[str, Any]:
    """Fire clients × requests chat completions (case (k + j) mod len for client k's j-th); return the figures."""
    from openai import OpenAI

    client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)

    def one_client(k: int) -> list[tuple[int, float, str | None]]:
        rows = []
        for j in range(requests):
            case = (k + j) % len(cases)
            image_url, prompt = cases[case]
            start = time.perf_counter()
            try:
                reply = client.chat.completions.create(
                    model=model, temperature=0, max_tokens=max_tokens, messages=[{"role": "user", "content": [
                        {"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": prompt}]}])
                text = reply.choices[0].message.content
            except Exception as exc:  # noqa: BLE001 - a lost request is a result here, not a crash
                text = None
                print(f"request failed: {exc}", file=sys.stderr)
            rows.append((case, time.perf_counter() - start, text))
        return rows

    before = _health(url)
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        rows = [row for client_rows in pool.map(one_client, range(clients)) for row in client_rows]
    wall = time.perf_counter() - start
    after = _health(url)
    latencies = sorted(t for _, t, _ in rows)

    def pct(p: float) -> float:
        return round(1000 * latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))], 1)

    batches = after["batches"] - before["batches"]
    return {"clients": clients, "requests_per_client": requests, "max_tokens": max_tokens, "requests": len(rows),
            "answered": sum(text is not None for _, _, text in rows), "wall_s": round(wall, 3),
            "requests_per_s": round(len(rows) / wall, 2),
            "latency_ms": {"p50": pct(50), "p90": pct(90), "p99": pct(99), "max": round(1000 * latencies[-1], 1)},
            "batches": batches, "mean_batch_size": round(len(rows) / batches, 2) if batches else None,
            "answers": [(case, text) for case, _, text in rows]}


def summary(report: dict[str, Any]) -> str:
    """One line for a human."""
    lat = report["latency_ms"]
    return (f"{report['answered']}/{report['requests']} answered from {report['clients']} clients in "
            f"{report['wall_s']:.2f}s ({report['requests_per_s']} req/s); latency p50 {lat['p50']:.0f} ms, "
            f"p90 {lat['p90']:.0f} ms, p99 {lat['p99']:.0f} ms, max {lat['max']:.0f} ms; {report['batches']} "
            f"batches, mean {report['mean_batch_size']} requests per batch")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command line: run the load test against a live server and print (and optionally save) the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default=None, help="model id (default: the server's only model)")
    parser.add_argument("--image", action="append", required=True, help="image file (repeat for several)")
    parser.add_argument("--prompt", action="append", default=None, help="question (repeat for several)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=10, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--out", default=None, help="write the report here as JSON")
    args = parser.parse_args(argv)
    model = args.model
    if model is None:
        with urllib.request.urlopen(args.url + "/v1/models", timeout=30) as resp:
            model = json.loads(resp.read())["data"][0]["id"]
    urls = [f"data:image/png;base64,{base64.b64encode(Path(p).read_bytes()).decode()}" for p in args.image]
    prompts = args.prompt or ["describe", "what is in it?", "what colours?"]
    cases = [(urls[i % len(urls)], q) for i, q in enumerate(prompts)]
    report = run(args.url, model, cases, clients=args.clients, requests=args.requests, max_tokens=args.max_tokens)
    print(summary(report))
    if args.out:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from _common import machine_info, write_json

        write_json(args.out, {**report, "model": model, "machine": machine_info(),
                              "date": time.strftime("%Y-%m-%d")})
    return report


if __name__ == "__main__":
    main()
