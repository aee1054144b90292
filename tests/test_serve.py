"""`vpgtrans serve` through the official `openai` client on loopback: same text as `generate` / `chat`."""

from __future__ import annotations

import importlib.util
import socket
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from serve_helpers import CLI, data_url, live_server, make_model, request, require_serve_extra, user_turn

from vpgtrans.testing import tiny_images

require_serve_extra()
MAX_TOKENS = 12
BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "serve_load.py"


@pytest.fixture(scope="module")
def model_dir(tiny_paths, tmp_path_factory):
    return make_model(tiny_paths, tmp_path_factory.mktemp("serve") / "tiny-chat")


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-images")
    paths = []
    for i, img in enumerate(tiny_images(2, seed=5)):
        paths.append(root / f"{i}.png")
        img.save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def server(model_dir):
    with live_server(model_dir) as (url, lines):
        yield url, lines


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def local_model(model_dir):
    from vpgtrans.cli.generate import load_for_inference

    return load_for_inference(str(model_dir), "cpu")


def _generate_cli(model_dir, image, prompt: str, max_tokens: int = MAX_TOKENS) -> str:
    from vpgtrans.cli import main

    result = CliRunner().invoke(main, ["generate", "--model", str(model_dir), "--image", str(image), "--prompt", prompt,
                                       "--max-new-tokens", str(max_tokens), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    return result.stdout.rstrip("\n")


def _ask(client, messages, stream=False, **kw):
    """(text, finish_reason, usage or None) of one chat completion; streamed deltas are joined."""
    reply = client.chat.completions.create(model="tiny-chat", messages=messages, stream=stream,
                                           **{"temperature": 0, "max_tokens": MAX_TOKENS, **kw})
    if not stream:
        return reply.choices[0].message.content, reply.choices[0].finish_reason, reply.usage
    text, reason, usage = "", None, None
    for chunk in reply:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            reason = choice.finish_reason or reason
    return text, reason, usage


def test_models_health_info_and_loopback_default(server, client):
    url, lines = server
    assert [m.id for m in client.models.list().data] == ["tiny-chat"]
    assert url.startswith("http://127.0.0.1:")  # no --host given: loopback only
    assert not any("warning" in line for line in lines)
    status, health = request("GET", url + "/health")
    assert status == 200 and health["status"] == "ok"
    status, info = request("GET", url + "/info")
    assert info["components"]["vpg"]["name"] == "qformer" and info["components"]["llm"]["name"] == "opt"
    assert info["limits"]["context_tokens"] == 256 and info["limits"]["image_soft_prompts"] == 4


@pytest.mark.parametrize("stream", [False, True])
def test_greedy_answer_is_what_vpgtrans_generate_prints(client, model_dir, image_files, stream):
    for image, prompt in ((image_files[0], "describe"), (image_files[1], "what is in it?")):
        expected = _generate_cli(model_dir, image, prompt)
        assert expected, "compare against a non-empty answer"
        text, reason, _ = _ask(client, [user_turn(prompt, data_url(image.read_bytes()))], stream=stream)
        assert text == expected
        assert reason in ("stop", "length")


@pytest.mark.parametrize("stream", [False, True])
def test_multi_turn_follows_the_chat_template(client, local_model, image_files, stream):
    from vpgtrans.cli.chat import ChatSession
    from vpgtrans.images import open_image
    from vpgtrans.interfaces import GenerationConfig

    session = ChatSession(local_model, open_image(image_files[0]), GenerationConfig(max_new_tokens=MAX_TOKENS))
    questions = ["what is it?", "and its colour?", "anything else?"]
    expected = [session.ask(q) for q in questions]
    url = data_url(image_files[0].read_bytes())
    messages = [{"role": "system", "content": "ignored: the template has no system slot"}]
    for i, question in enumerate(questions):
        messages.append(user_turn(question, url if i == 0 else None))
        text, _, _ = _ask(client, messages, stream=stream)
        assert text == expected[i]
        messages.append({"role": "assistant", "content": text})


def test_stop_strings_max_tokens_and_usage(client, model_dir, image_files):
    url = data_url(image_files[0].read_bytes())
    full = _generate_cli(model_dir, image_files[0], "describe", max_tokens=20)
    assert len(full) > 3
    stop = full[len(full) // 2:len(full) // 2 + 2]
    expected = full[:full.find(stop)].strip()
    for stream in (False, True):
        text, reason, usage = _ask(client, [user_turn("describe", url)], stream=stream, max_tokens=20, stop=[stop],
                                   stream_options={"include_usage": True} if stream else None)
        assert (text, reason) == (expected, "stop")
        assert 0 < usage.completion_tokens < 20 and usage.prompt_tokens > 4
    text, reason, usage = _ask(client, [user_turn("describe", url)], max_tokens=3)
    assert reason == "length" and usage.completion_tokens == 3
    assert full.startswith(text)


def test_sampling_follows_the_seed(client, image_files):
    messages = [user_turn("describe", data_url(image_files[1].read_bytes()))]
    runs = [_ask(client, messages, temperature=1.0, top_p=0.9, seed=seed, max_tokens=16)[0] for seed in (7, 7, 8)]
    assert runs[0] == runs[1]


@pytest.mark.slow
def test_concurrent_clients_are_all_answered(server, model_dir, image_files):
    """Load test: 16 clients × 10 requests on loopback; none lost, each equal to the unbatched greedy answer."""
    spec = importlib.util.spec_from_file_location("serve_load", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    cases = [(image_files[i % 2], prompt) for i, prompt in enumerate(["describe", "what is in it?", "colours?"])]
    expected = [_generate_cli(model_dir, image, prompt, max_tokens=8) for image, prompt in cases]
    report = bench.run(server[0], "tiny-chat", [(data_url(p.read_bytes()), q) for p, q in cases], clients=16,
                       requests=10, max_tokens=8)
    print("\nload:", bench.summary(report))
    assert report["requests"] == report["answered"] == 160
    assert all(text == expected[case] for case, text in report["answers"])
    assert report["batches"] < 160  # concurrent requests were decoded together


def test_public_host_warns_and_a_taken_port_is_one_line(model_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        proc = subprocess.run([*CLI, "serve", "--model", str(model_dir), "--host", "0.0.0.0", "--port", str(port)],
                              capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2
    assert lines[0].startswith("warning: --host 0.0.0.0 listens on every network interface")
    assert lines[1].startswith(f"error: cannot listen on 0.0.0.0:{port}") and len(lines) == 2



def test_a_cancelled_job_stops_decoding_and_a_full_queue_is_429(local_model, image_files):
    from vpgtrans.images import open_image
    from vpgtrans.serve.engine import Engine, Job
    from vpgtrans.serve.schema import ApiError, Conversation

    engine = Engine(local_model, max_queue=2)
    conv = Conversation(history=[], question="describe", image=open_image(image_files[0]), image_key="k")
    events: list[tuple] = []

    def emit(event: tuple) -> None:  # the client "goes away" after the first piece of text
        events.append(event)
        if event[0] == "delta":
            job.cancelled.set()

    job = Job(conv, emit=emit, max_tokens=100, temperature=0)
    engine._run([job])  # on this thread: no worker started
    assert events[0] == ("start", events[0][1]) and events[-1][0] == "done"
    assert events[-1][4] <= 2  # completion tokens: decoding stopped right after the cancel

    for _ in range(2):
        engine.submit(Job(conv, emit=events.append))
    with pytest.raises(ApiError) as refused:
        engine.submit(Job(conv, emit=events.append))
    assert refused.value.status == 429 and refused.value.body()["error"]["code"] == "queue_full"


def test_the_page_is_told_where_the_vpg_came_from(tiny_paths, tmp_path):
    from vpgtrans.checkpoint import save_model
    from vpgtrans.model import build_model
    from vpgtrans.serve.app import describe
    from vpgtrans.testing import tiny_spec

    model = build_model(tiny_spec(tiny_paths, llm="llama"))
    save_model(model, tmp_path / "m", extra={"transfer": {"source": "runs/opt-s/model", "dst": "world-llama",
                                                          "report": {"nested": "left out"}}})
    info = describe(str(tmp_path / "m"))
    assert info["components"]["llm"] == {"name": "llama", "path": str(tiny_paths["llama"])}
    assert info["origin"] == {"kind": "VPGTrans transfer", "source": "runs/opt-s/model", "dst": "world-llama"}


@pytest.mark.parametrize("llm", ["llama", "t5"])
def test_engine_decodes_like_generate_for_other_llm_kinds(tiny_paths, tmp_path, llm):
    """The worker's batched decoding (streamed pieces included) gives generate's text for LLaMA and FlanT5 too."""
    import torch

    from vpgtrans.interfaces import GenerationConfig
    from vpgtrans.model import build_model
    from vpgtrans.serve.engine import Engine, Job
    from vpgtrans.serve.schema import Conversation
    from vpgtrans.testing import tiny_spec

    torch.manual_seed(0)
    spec = tiny_spec(tiny_paths, llm=llm)
    spec["template"] = {"text": "###Human: <Img><ImageHere></Img> {instruction} ###Assistant: ", "end": "###"}
    model = build_model(spec).eval()
    images = tiny_images(2, seed=4)
    prompts = ["describe", "what is in this picture?"]
    expected = [model.generate([img], q, config=GenerationConfig(max_new_tokens=10))[0]
                for img, q in zip(images, prompts)]
    assert all(expected), expected  # the comparison must not be between empty texts
    events: list[list[tuple]] = [[], []]
    jobs = [Job(Conversation([], q, img, f"k{i}"), emit=events[i].append, max_tokens=10, temperature=0)
            for i, (img, q) in enumerate(zip(images, prompts))]
    Engine(model)._run(jobs)  # one batch of two, left-padded
    for i, got in enumerate(events):
        assert got[-1][0] == "done" and got[-1][1] == expected[i]
        assert "".join(e[1] for e in got if e[0] == "delta") == expected[i]
