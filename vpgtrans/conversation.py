"""Multi-turn text around the soft prompts: the template's first turn, later turns from its turn markers.

Shared by `vpgtrans chat` and `vpgtrans serve`. The first turn is the template itself (e.g. MiniGPT-4's
``###Human: <Img><ImageHere></Img> {instruction} ###Assistant: ``); later turns reuse the template's turn
markers without the image: each answer is closed with the template's end symbol and the next question
follows, e.g. ``{answer}###Human: {next} ###Assistant: ``.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

from .errors import ConfigError

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
