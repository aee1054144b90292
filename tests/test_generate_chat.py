"""`vpgtrans generate` (one image, folder → JSONL) and `vpgtrans chat` driven through stdin."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from vpgtrans.checkpoint import save_model
from vpgtrans.cli import main
from vpgtrans.cli.chat import ChatSession
from vpgtrans.cli.generate import load_for_inference
from vpgtrans.conversation import turn_markers
from vpgtrans.errors import ConfigError
from vpgtrans.interfaces import GenerationConfig
from vpgtrans.model import Template, build_model
from vpgtrans.testing import tiny_images, tiny_spec

MINIGPT4 = {"text": "###Human: <Img><ImageHere></Img> {instruction} ###Assistant: ", "end": "###"}
INSTRUCTIONS = ["Describe this image in detail.", "Take a look at this image and describe what you notice."]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tiny_paths, tmp_path_factory):
    """A tiny MiniGPT-4-template model (Q-Former × OPT) written with save_model."""
    torch.manual_seed(0)
    spec = tiny_spec(tiny_paths, llm="opt")
    spec["template"] = MINIGPT4
    return save_model(build_model(spec), tmp_path_factory.mktemp("chat") / "model")


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    (root / "sub").mkdir()
    for i, img in enumerate(tiny_images(3)):
        img.save(root / ("sub/c.png" if i == 2 else f"{'ab'[i]}.jpg"))
    (root / "notes.txt").write_text("not an image")
    return root


@pytest.mark.parametrize("llm", ["opt", "llama", "t5"])
def test_minigpt4_template_trains_and_generates(tiny_paths, llm):
    torch.manual_seed(0)
    spec = tiny_spec(tiny_paths, llm=llm)
    spec["template"] = MINIGPT4
    model = build_model(spec)
    sample = model.template.sample(INSTRUCTIONS[0], "a red circle")
    assert sample.before == "###Human: <Img>" and sample.after == f"</Img> {INSTRUCTIONS[0]} ###Assistant: "
    assert sample.target == "a red circle###"
    feats = model.encode_images(model.vision.preprocess(tiny_images(2)))
    model.train()
    loss = model(feats, [sample, model.template.sample(INSTRUCTIONS[1], "two blue squares")])
    assert torch.isfinite(loss)
    loss.backward()
    assert model.projector.weight.grad.abs().sum() > 0
    model.eval()
    out = model.generate(features=feats, prompt=INSTRUCTIONS[0], config=GenerationConfig(max_new_tokens=6))
    assert len(out) == 2 and not any("###" in t for t in out)


def test_generate_one_image_matches_the_api(model_dir, image_dir):
    from vpgtrans.images import open_image

    result = CliRunner().invoke(main, ["generate", "--model", str(model_dir), "--image", str(image_dir / "a.jpg"),
                                       "--prompt", "describe", "--max-new-tokens", "5", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    model = load_for_inference(str(model_dir), "cpu")
    expected = model.generate([open_image(image_dir / "a.jpg")], "describe", config=GenerationConfig(max_new_tokens=5))
    assert result.stdout == expected[0] + "\n"


def test_generate_folder_to_jsonl(model_dir, image_dir, tmp_path):
    out = tmp_path / "caps.jsonl"
    result = CliRunner().invoke(main, ["generate", "--model", str(model_dir), "--images", str(image_dir), "--out",
                                       str(out), "--batch-size", "2", "--max-new-tokens", "4", "--beams", "2"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["image"] for r in rows] == ["a.jpg", "b.jpg", "sub/c.png"]
    assert all(isinstance(r["text"], str) for r in rows)
    assert "wrote 3 captions" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["caps.jsonl"]  # no temp files left behind
    # Batching does not change the text: the single-image command gives the same caption.
    single = CliRunner().invoke(main, ["generate", "--model", str(model_dir), "--image", str(image_dir / "b.jpg"),
                                       "--max-new-tokens", "4", "--beams", "2"])
    assert single.stdout.strip() == rows[1]["text"]


def test_generate_folder_bad_image_stops_or_is_skipped(model_dir, image_dir, tmp_path):
    bad_root = tmp_path / "imgs"
    bad_root.mkdir()
    tiny_images(1)[0].save(bad_root / "good.png")
    (bad_root / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    out = tmp_path / "out.jsonl"
    args = ["generate", "--model", str(model_dir), "--images", str(bad_root), "--out", str(out),
            "--max-new-tokens", "3"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "corrupt" in result.stderr and not out.exists()
    result = CliRunner().invoke(main, args + ["--skip-bad-images"])
    assert result.exit_code == 0, result.output
    assert [json.loads(x)["image"] for x in out.read_text().splitlines()] == ["good.png"]
    assert "1 unreadable images skipped" in result.stderr


@pytest.mark.parametrize("args, message", [
    ([], "exactly one of --image and --images"),
    (["--image", "x.png", "--images", "."], "exactly one of --image and --images"),
    (["--images", "."], "--images needs --out"),
    (["--image", "missing.png"], "image not found"),
])
def test_generate_usage_errors_are_one_line(model_dir, args, message):
    result = CliRunner().invoke(main, ["generate", "--model", str(model_dir), *args])
    assert result.exit_code == 2 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("template, markers", [
    (MINIGPT4, ("Human: ", " ###Assistant: ")),
    ({"text": "[INST] <Img><ImageHere></Img> {instruction} [/INST] ", "end": "</s>"}, ("[INST] ", " [/INST] ")),
    ({"text": "<ImageHere>Question: {instruction} Answer:"}, (" Question: ", " Answer:")),
    ({"text": "<ImageHere>{instruction}"}, (" ", "")),
])
def test_turn_markers_follow_the_template(template, markers):
    assert turn_markers(Template(**template)) == markers


def test_turn_markers_need_an_instruction_slot():
    with pytest.raises(ConfigError, match="instruction"):
        turn_markers(Template(text="<ImageHere> a photo of"))


def test_chat_session_builds_the_minigpt4_conversation(model_dir):
    model = load_for_inference(str(model_dir), "cpu")
    session = ChatSession(model, tiny_images(1)[0], GenerationConfig(max_new_tokens=4))
    first = session.ask("what is it?")
    second_prompt = session.sample("and its colour?")
    assert second_prompt.before == "###Human: <Img>"
    assert second_prompt.after == f"</Img> what is it? ###Assistant: {first}###Human: and its colour? ###Assistant: "
    session.ask("and its colour?")
    assert len(session.history) == 2
    session.reset()
    assert session.sample("again").after == "</Img> again ###Assistant: "


def test_chat_through_stdin(model_dir, image_dir):
    from vpgtrans.images import open_image

    model = load_for_inference(str(model_dir), "cpu")
    session = ChatSession(model, open_image(image_dir / "a.jpg"), GenerationConfig(max_new_tokens=5))
    expected = [session.ask("what is it?"), session.ask("what colour?")]
    session.reset()
    expected.append(session.ask("describe it"))
    assert any(expected), expected  # the comparison below must not be between empty answers

    args = ["chat", "--model", str(model_dir), "--image", str(image_dir / "a.jpg"), "--max-new-tokens", "5"]
    stdin = "what is it?\n\nwhat colour?\n/reset\ndescribe it\n/help\n"
    result = CliRunner().invoke(main, args, input=stdin)  # ends with EOF, not /quit
    assert result.exit_code == 0, result.output
    assert result.stdout == "".join(a + "\n" for a in expected)
    assert "conversation reset" in result.stderr and "/quit" in result.stderr

    quit_early = CliRunner().invoke(main, args, input="what is it?\n/quit\nwhat colour?\n")
    assert quit_early.exit_code == 0 and quit_early.stdout == expected[0] + "\n"

    switch = f"/image {image_dir / 'missing.png'}\n/image {image_dir / 'b.jpg'}\n"
    switched = CliRunner().invoke(main, args, input=switch)
    assert switched.exit_code == 0 and "image not found" in switched.stderr and "now talking about" in switched.stderr


# --- chat with captioners (templates without turn markers: BLIP-2's `<ImageHere>{instruction}`) --------------------

@pytest.fixture(scope="module")
def caption_model_dir(tiny_paths, tmp_path_factory):
    """A tiny model with the plain template the world's captioning models (the demo's) are trained with."""
    torch.manual_seed(0)
    return save_model(build_model(tiny_spec(tiny_paths, llm="opt")), tmp_path_factory.mktemp("cap") / "model")


def test_chat_asks_a_captioner_questions_the_way_its_llm_saw_them(caption_model_dir):
    model = load_for_inference(str(caption_model_dir), "cpu")
    assert model.template.text == "<ImageHere>{instruction}" and not model.template.end
    session = ChatSession(model, tiny_images(1)[0], GenerationConfig(max_new_tokens=3))
    assert session.captions
    assert session.sample("is there a red circle?").after == "Question: is there a red circle? Answer:"
    session.history = [("is there a red circle?", "yes")]
    assert session.sample("what colour is the square?").after == \
        "Question: is there a red circle? Answer: yes. Question: what colour is the square? Answer:"
    assert session.sample("") == model.template.sample("")  # a caption: the image alone, as in training


def test_chat_answers_never_carry_the_template_markers(caption_model_dir, monkeypatch):
    model = load_for_inference(str(caption_model_dir), "cpu")
    session = ChatSession(model, tiny_images(1)[0], GenerationConfig(max_new_tokens=3))
    replies = iter(["Answer:yes Question: is it blue? Answer: no", " a red circle on the left"])
    monkeypatch.setattr(model.llm, "generate", lambda prompts, samples, config: [next(replies)])
    assert session.ask("is there a red circle?") == "yes"
    assert session.ask("") == "a red circle on the left"
    assert session.history == [("is there a red circle?", "yes")]  # the caption is no turn


@pytest.mark.parametrize("template, text, answer", [
    ({"text": "<ImageHere>{instruction}"}, "Answer: no. Question: and now?", "no."),
    (MINIGPT4, "Assistant: a cat on a mat###Human: more", "a cat on a mat"),
    ({"text": "<ImageHere>Question: {instruction} Answer:"}, " yes Question: x", "yes"),
])
def test_clean_answer_cuts_the_templates_own_markers(template, text, answer):
    from vpgtrans.conversation import clean_answer

    assert clean_answer(Template(**template), text) == answer


def test_chat_empty_line_asks_a_captioner_for_a_caption(caption_model_dir, image_dir):
    from vpgtrans.images import open_image

    model = load_for_inference(str(caption_model_dir), "cpu")
    session = ChatSession(model, open_image(image_dir / "a.jpg"), GenerationConfig(max_new_tokens=4))
    caption, answer = session.ask(""), session.ask("what is it?")
    args = ["chat", "--model", str(caption_model_dir), "--image", str(image_dir / "a.jpg"), "--max-new-tokens", "4"]
    result = CliRunner().invoke(main, args, input="\nwhat is it?\n")
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{caption}\n{answer}\n" and "empty line asks for a caption" in result.stderr
