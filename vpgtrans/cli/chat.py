"""`vpgtrans chat`: a multi-turn conversation about one image, in the model's own template.

How the turns are written around the soft prompts: `vpgtrans.conversation`.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from ..conversation import chat_instruction, chat_sample, clean_answer, is_plain, turn_markers
from ..errors import DataError
from .generate import generation_options, load_for_inference

# why project modules are imported inside the commands: `vpgtrans --help` must not import torch or transformers

HELP = "commands: /reset starts over, /image PATH switches image (and resets), /quit or Ctrl-D leaves"
CAPTION_HELP = "an empty line asks for a caption"


class ChatSession:
    """One image, a growing conversation; `ask` returns the model's next answer."""

    def __init__(self, model: Any, image: Any, config: Any):
        self.model = model
        self.config = config
        turn_markers(model.template)  # refuse a template without {instruction} before the first question
        self.history: list[tuple[str, str]] = []
        self.set_image(image)

    def set_image(self, image: Any) -> None:
        """Encode a new image once and start a fresh conversation about it."""
        device = self.model.projector.weight.device
        self.features = self.model.encode_images(self.model.vision.preprocess([image]).to(device))
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the image stays)."""
        self.history = []

    @property
    def captions(self) -> bool:
        """True when the model's template has no turn markers: it captions on an empty line (BLIP-2 style)."""
        return is_plain(self.model.template)

    def sample(self, question: str) -> Any:
        """The text around the soft prompts for the whole conversation up to `question` ('' = a caption)."""
        return chat_sample(self.model.template, self.history, question)

    def ask(self, question: str) -> str:
        """Generate the answer to `question` given the conversation so far, and remember both ('' = a caption)."""
        import torch

        model = self.model
        instructions = [chat_instruction(model.template, question)] if model.vpg.uses_instruction else None
        with torch.no_grad():
            text = model.llm.generate(model.prompts(self.features, instructions), [self.sample(question)],
                                      self.config)[0]
        answer = clean_answer(model.template, text)
        if question:  # a caption is about the image, not a turn of the conversation
            self.history.append((question, answer))
        return answer


def read_line() -> str:
    """The user's next line ('' at EOF): with line editing and history (readline) on a terminal."""
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401 - importing it gives input() cursor keys, editing and history
        except ImportError:  # e.g. Windows without pyreadline: plain input still works
            pass
        try:
            return input("> ") + "\n"
        except EOFError:
            return ""
    click.echo("> ", nl=False, err=True)
    return sys.stdin.readline()


@click.command()
@click.option("--model", "model_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="A vpgtrans model directory.")
@click.option("--image", "image_path", required=True, type=click.Path(dir_okay=False), help="Image to talk about.")
@generation_options
def chat(model_dir: str, image_path: str, beams: int, max_new_tokens: int, device: str) -> None:
    """Talk about an image, turn by turn (answers on stdout, prompts on stderr)."""
    from ..images import open_image
    from ..interfaces import GenerationConfig

    image = open_image(image_path)
    model = load_for_inference(model_dir, device)
    session = ChatSession(model, image, GenerationConfig(max_new_tokens=max_new_tokens, num_beams=beams))
    help_text = f"{HELP}; {CAPTION_HELP}" if session.captions else HELP
    click.echo(f"chatting about {image_path} — {help_text}", err=True)
    while True:
        line = read_line()
        if not line:  # EOF (Ctrl-D or end of piped input)
            click.echo("", err=True)
            break
        text = line.strip()
        if not text:
            if session.captions:
                click.echo(session.ask(""))
            continue
        if text in ("/quit", "/exit"):
            break
        if text == "/reset":
            session.reset()
            click.echo("(conversation reset)", err=True)
        elif text == "/image" or text.startswith("/image "):
            path = text[len("/image"):].strip()
            try:
                session.set_image(open_image(path))
            except DataError as exc:
                click.echo(f"error: {exc}", err=True)
                continue
            click.echo(f"(now talking about {path}; conversation reset)", err=True)
        elif text.startswith("/"):
            click.echo(help_text, err=True)
        else:
            click.echo(session.ask(text))
