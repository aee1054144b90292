"""What a Hugging Face user needs beside the weights: a chat template that writes vpgtrans's prompt layout,
a generation config that stops where vpgtrans stops, and a README.md model card with the exact snippet.

The documented call is the one stock model cards use: render the prompt with the chat template
(`processor.tokenizer.apply_chat_template`), then `processor(images=…, text=…, padding=True)` and `model.generate`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..model import IMAGE_SLOT

EXAMPLE_INSTRUCTION = "What is in the picture?"


@dataclass
class Usage:
    """How the stock call reproduces vpgtrans: which class, what the chat template writes, how to decode."""

    model_cls: str
    chat_template: str
    decoder_only: bool
    end: str = ""
    one_per_call: bool = False  # batched prompts of different lengths would not give vpgtrans's text (see Notes)


def _literal(text: str) -> str:
    """`text` as a Jinja expression that prints it verbatim (JSON string syntax is valid Jinja)."""
    return "{{ " + json.dumps(text) + " }}" if text else ""


def _segment(text: str) -> str:
    """A template segment with `{instruction}` filled from the conversation."""
    parts = text.split("{instruction}")
    return "{{ instruction }}".join(_literal(p) for p in parts)


def chat_template(model: Any, image_slot: str, bos_after_image: bool = False) -> str:
    """Jinja chat template writing the model's own prompt: the last user message's text is the instruction.

    `image_slot` is what stands where the soft prompts go ("" when the processor prepends the image
    tokens itself); `bos_after_image` writes BOS right after it (vpgtrans's `[image][BOS] text`).
    """
    before, after = model.template.text.split(IMAGE_SLOT)
    head = ("{%- set ns = namespace(text='') -%}"
            "{%- for m in messages if m['role'] == 'user' -%}"
            "{%- if m['content'] is string -%}{%- set ns.text = m['content'] -%}"
            "{%- else -%}{%- set ns.text = m['content'] | selectattr('type', 'equalto', 'text') "
            "| map(attribute='text') | join(' ') -%}{%- endif -%}"
            "{%- endfor -%}{%- set instruction = ns.text -%}")
    slot = _literal(image_slot) + ("{{ bos_token }}" if bos_after_image else "")
    return head + _segment(before) + slot + _segment(after)


def generation_config(stock: Any, part: Any) -> Any:
    """The stock model's generation config: greedy, vpgtrans's stop ids, the tokenizer's pad."""
    from transformers import GenerationConfig  # why: importing transformers costs seconds

    cfg = part.config
    gen = GenerationConfig(eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id, max_new_tokens=30,
                           do_sample=False, num_beams=1)
    if cfg.is_encoder_decoder:
        gen.decoder_start_token_id = cfg.decoder_start_token_id
    else:
        gen.bos_token_id = cfg.bos_token_id
    stock.generation_config = gen
    return gen


def snippet(usage: Usage, where: str) -> str:
    """The Python a user runs on the export: chat template → processor → generate → decode."""
    cut = (f'.split({usage.end!r})[0]' if usage.end else "")
    new = 'out[:, inputs["input_ids"].shape[1]:]' if usage.decoder_only else "out"
    return f'''import torch
from PIL import Image
from transformers import AutoProcessor, {usage.model_cls}

processor = AutoProcessor.from_pretrained("{where}")
model = {usage.model_cls}.from_pretrained("{where}").eval()
images = [Image.open("photo.jpg").convert("RGB"), Image.open("other.jpg").convert("RGB")]
questions = ["{EXAMPLE_INSTRUCTION}", ""]  # "" = plain caption
# (the tokenizer's chat template: Blip2Processor / InstructBlipProcessor do not load one of their own)
prompts = [processor.tokenizer.apply_chat_template(
    [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": q}}]}}],
    add_generation_prompt=True, tokenize=False) for q in questions]
{_generate(usage, new)}print([t{cut}.strip() for t in texts])
'''


def _generate(usage: Usage, new: str) -> str:
    if usage.one_per_call:
        return f'''texts = []
for image, prompt in zip(images, prompts):  # one prompt per call (see Notes)
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=30)  # greedy; num_beams=5 for beam search
    texts += processor.batch_decode({new}, skip_special_tokens=True)
'''
    return f'''inputs = processor(images=images, text=prompts, padding=True, return_tensors="pt")
with torch.no_grad():
    out = model.generate(**inputs, max_new_tokens=30)  # greedy; num_beams=5 for beam search
texts = processor.batch_decode({new}, skip_special_tokens=True)
'''


def _rows(title: str, items: dict[str, Any]) -> list[str]:
    lines = [f"## {title}", "", "| | |", "|---|---|"]
    lines += [f"| {k} | `{v}` |" for k, v in items.items() if v not in (None, "", {})]
    return lines + [""]


def model_card(model: Any, usage: Usage, fmt: str, manifest: dict[str, Any] | None, notes: list[str],
               scores: dict[str, Any] | None = None) -> str:
    """README.md for the export: components, training, measured scores, the exact snippet, what to know."""
    spec = model.spec
    manifest = manifest or {}
    training = manifest.get("training") or manifest.get("transfer") or manifest.get("imported_from") or {}
    lines = ["---", "library_name: transformers", "pipeline_tag: image-text-to-text", "tags: [vpgtrans]", "---", "",
             f"# vpgtrans model exported as `{usage.model_cls}` ({fmt})", "",
             "Four parts in a row: image → frozen vision encoder → visual prompt generator (VPG) → projector → "
             "frozen LLM.", ""]
    lines += _rows("Components", {"vision encoder": spec.vision.get("name") and
                                  f"{spec.vision['name']} ({spec.vision.get('path', '')})",
                                  "VPG": spec.vpg.get("name"),
                                  "LLM": f"{spec.llm.get('name')} ({spec.llm.get('path', '')})",
                                  "LoRA": spec.lora and f"r={spec.lora.get('r')}",
                                  "prompt template": model.template.text,
                                  "end of answer": model.template.end})
    lines += _rows("Training", {k: json.dumps(v) if isinstance(v, (dict, list)) else v
                                for k, v in training.items()}) if training else ["## Training", "",
                                                                                 "Not recorded.", ""]
    if scores:
        lines += _rows("Measured scores", scores)
    else:
        lines += ["## Measured scores", "", "None recorded with this export (`vpgtrans export --scores "
                                            "eval.json` adds the output of `vpgtrans eval --out eval.json`).", ""]
    lines += ["## Use", "", "With stock transformers only (the chat template writes the prompt layout the model "
              "was trained on; do not hand-write it):", "", "```python", snippet(usage, "<this directory>"), "```",
              "", "The same text as `vpgtrans generate --model <vpgtrans model> --image photo.jpg --prompt "
              f"\"{EXAMPLE_INSTRUCTION}\"`, greedy or with beams, "
              + ("one prompt per call (see Notes)." if usage.one_per_call else
                 "batched prompts included (the tokenizer pads on the " + ("left" if usage.decoder_only else "right")
                 + ")."), ""]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


def write_usage(tmp: Path, model: Any, usage: Usage, fmt: str, manifest: dict[str, Any] | None, notes: list[str],
                scores: dict[str, Any] | None) -> None:
    """Write README.md into the export being assembled."""
    (tmp / "README.md").write_text(model_card(model, usage, fmt, manifest, notes, scores))

