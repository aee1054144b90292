"""Multi-turn text around the soft prompts: the template's first turn, later turns from its turn markers.

Shared by `vpgtrans chat` and `vpgtrans serve`. The first turn is the template itself (e.g. MiniGPT-4's
``###Human: <Img><ImageHere></Img> {instruction} ###Assistant: ``); later turns reuse the template's turn
markers without the image: each answer is closed with the template's end symbol and the next question
follows, e.g. ``{answer}###Human: {next} ###Assistant: ``.

`chat_sample` is what `vpgtrans chat` asks: a template without turn markers of its own (BLIP-2's
``<ImageHere>{instruction}``: captioners, VQA models) was trained on an empty instruction (a caption) or on
``Question: {q} Answer:`` — so an empty line asks for a caption and a question is written that way, earlier
turns as BLIP-2's demo writes them (``Question: {q} Answer: {a}.``).
"""

from __future__ import annotations

import re
from typing import Any, Sequence

from .errors import ConfigError

# BLIP-2's question format, shared with evaluation (which imports it from here: this module stays torch-free).
DEFAULT_VQA_PROMPT = "Question: {} Answer:"

# Tag-like tokens glued to the image slot (<Img>…</Img>) belong to the image, not to a turn.
_TAGS_BEFORE = re.compile(r"(<[^<>\s]*>)*$")
_TAGS_AFTER = re.compile(r"^(<[^<>\s]*>)*\s*")


def turn_markers(template: Any) -> tuple[str, str]:
    """(text before, text after) a follow-up question: the template's turn without the image."""
    from .model import IMAGE_SLOT

    if "{instruction}" not in template.text:
        raise ConfigError(f"the model's template {template.text!r} has no {{instruction}} slot",
                          "chat needs a template with {instruction}, e.g. MiniGPT-4's")
    before_image, after_image = template.text.split(IMAGE_SLOT)
    head = before_image[: _TAGS_BEFORE.search(before_image).start()]
    pre_instruction, tail = after_image.split("{instruction}", 1)
    head += pre_instruction[_TAGS_AFTER.match(pre_instruction).end():]
    end = template.end
    if end and head.startswith(end):
        head = head[len(end):]  # the end symbol that closes an answer already opens the next turn
    elif not end and head[:1] not in (" ", "\n"):
        head = " " + head
    return head, tail


def conversation_sample(template: Any, history: Sequence[tuple[str, str]], question: str) -> Any:
    """The text around the soft prompts for a conversation: (question, answer) turns, then `question`."""
    from .interfaces import TextSample

    first = template.sample(history[0][0] if history else question)
    if not history:
        return first
    head, tail = turn_markers(template)
    questions = [q for q, _ in history] + [question]
    after = first.after
    for (_, answer), follow_up in zip(history, questions[1:]):
        after += answer + template.end + head + follow_up + tail
    return TextSample(before=first.before, after=after)


def is_plain(template: Any) -> bool:
    """True for a template with no turn markers of its own (BLIP-2's `<ImageHere>{instruction}`)."""
    head, tail = turn_markers(template)
    return not head.strip() and not tail.strip() and not template.end


def _qa_format() -> str:
    return DEFAULT_VQA_PROMPT


def chat_sample(template: Any, history: Sequence[tuple[str, str]], question: str) -> Any:
    """The text for chat's next answer in the layout the model was trained on (see the module docstring).

    An empty `question` asks for a caption of the image alone (a captioner's training prompt); `history` is
    then not part of it.
    """
    if not question:
        return template.sample("")
    if not is_plain(template):
        return conversation_sample(template, history, question)
    qa = _qa_format()
    turns = [f"{qa.format(q)} {a.rstrip('.')}." for q, a in history if q]
    return template.sample(" ".join([*turns, qa.format(question)]))


def chat_instruction(template: Any, question: str) -> str:
    """What an instruction-aware VPG (InstructBLIP's Q-Former) reads for `question`: the text it was trained on."""
    return _qa_format().format(question) if question and is_plain(template) else question


def markers(template: Any) -> list[str]:
    """The template's own turn markers as they could appear in generated text (`Question:`, `###Human:` …)."""
    if is_plain(template):
        return [part.strip() for part in _qa_format().split("{}") if part.strip()]
    head, tail = turn_markers(template)
    found = [m for m in (template.end, head.strip(), tail.strip()) if m]
    # "###Assistant:" is also echoed without the end symbol that opens it
    return found + [m[len(template.end):].strip() for m in found
                    if template.end and m.startswith(template.end) and m != template.end]


def clean_answer(template: Any, text: str) -> str:
    """The answer alone: a marker the model echoed first is dropped, the text is cut at the next marker."""
    found = markers(template)
    text = text.strip()
    for marker in found:  # e.g. a captioner asked "Question: … Answer:" that writes "Answer: yes"
        if text.startswith(marker):
            text = text[len(marker):].lstrip()
    cut = min((i for i in (text.find(m) for m in found) if i >= 0), default=len(text))
    return text[:cut].strip()
