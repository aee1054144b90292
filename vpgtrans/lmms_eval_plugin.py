"""lmms-eval model plugin: `lmms-eval --model vpgtrans --model_args pretrained=DIR --tasks …` on any vpgtrans model.

Registered through lmms-eval's entry-point group `lmms_eval.models` (pyproject.toml); nothing here runs
unless lmms-eval loads it. `write_task` turns a vpgtrans eval file (world test split, easy-vqa, COCO, JSONL)
into a local lmms-eval task (YAML + JSONL + utils.py) whose metrics are `vpgtrans eval`'s own:
`python -m vpgtrans.lmms_eval_plugin --data DATA --task caption --out DIR`, then `--include_path DIR`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch

from .evaluation import DEFAULT_VQA_PROMPT, _question_prompt, cider, vqa_score
from .interfaces import GenerationConfig

try:  # the `eval` extra; without it the task helpers below still work
    from lmms_eval.api.model import lmms as _LMMS
except ImportError:  # pragma: no cover - exercised only without the extra
    _LMMS = object

INSTALL = "pip install 'vpgtrans[eval]'  (lmms-eval==0.7.3; install it together with your torch pin)"


def manifest() -> Any:
    """The lmms-eval entry point: model id `vpgtrans` → `VpgtransLMM`."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="vpgtrans", simple_class_path="vpgtrans.lmms_eval_plugin.VpgtransLMM")


class VpgtransLMM(_LMMS):  # type: ignore[misc, valid-type]
    """A vpgtrans model directory as an lmms-eval model (batched generate_until, loglikelihood)."""

    is_simple = True

    def __init__(self, pretrained: str, device: str = "cpu", batch_size: int | str = 16, **_: Any) -> None:
        super().__init__()
        from .checkpoint import load_model

        self.model = load_model(str(pretrained), device=str(device))  # in eval mode
        self.batch_size_per_gpu = int(batch_size)

    # --- helpers ---------------------------------------------------------------------------------
    def _doc(self, task: str, split: str, doc_id: int) -> dict[str, Any]:
        return self.task_dict[task][split][doc_id]

    def _images(self, doc_to_visual: Any, task: str, split: str, doc_id: int) -> list[Any]:
        visuals = doc_to_visual(self._doc(task, split, doc_id))
        if len(visuals) != 1:
            from .errors import DataError

            raise DataError(f"task {task} doc {doc_id} has {len(visuals)} images; vpgtrans models read one",
                            "use single-image tasks")
        return visuals

    def _features(self, images: Sequence[Any]) -> torch.Tensor:
        model = self.model
        return model.encode_images(model.vision.preprocess(list(images)).to(model.projector.weight.device))

    # --- lmms-eval API ---------------------------------------------------------------------------
    def generate_until(self, requests: list[Any]) -> list[str]:
        """Batched greedy/beam decoding of each request's context about its image, in request order."""
        out: list[str] = []
        for start in range(0, len(requests), self.batch_size_per_gpu):
            batch = [r.args for r in requests[start:start + self.batch_size_per_gpu]]
            groups: dict[str, list[int]] = {}
            for i, args in enumerate(batch):  # one generate call per distinct decoding setting
                groups.setdefault(json.dumps(args[1], sort_keys=True, default=str), []).append(i)
            texts: list[str] = [""] * len(batch)
            for key, rows in groups.items():
                gen = dict(json.loads(key))
                until = gen.pop("until", None) or []
                config = GenerationConfig(max_new_tokens=int(gen.get("max_new_tokens", 30)),
                                          num_beams=int(gen.get("num_beams", 1)))
                images = [self._images(batch[i][2], *batch[i][4:6], batch[i][3])[0] for i in rows]
                with torch.no_grad():
                    got = self.model.generate(features=self._features(images), prompt=[batch[i][0] for i in rows],
                                              config=config)
                for i, text in zip(rows, got):
                    for stop in [until] if isinstance(until, str) else until:
                        text = text.split(stop)[0] if stop else text
                    texts[i] = text.strip()
            out += texts
        return out

    def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | image, context), whether greedy decoding would produce it)."""
        results = []
        for req in requests:
            context, doc_to_target, doc_to_visual, doc_id, task, split = req.args
            target = doc_to_target if isinstance(doc_to_target, str) else doc_to_target(self._doc(task, split, doc_id))
            images = self._images(doc_to_visual, task, split, doc_id)
            results.append(self._score(images[0], context, str(target)))
        return results

    def _score(self, image: Any, context: str, continuation: str) -> tuple[float, bool]:
        from vpgtrans_adapters.llm import IGNORE

        model = self.model
        llm = model.llm
        sample = model.template.sample(context)
        sample.target = continuation  # no template end, no EOS: only the continuation is scored
        instructions = [context] if model.vpg.uses_instruction else None
        with torch.no_grad():
            logits = model.logits(self._features([image]), [sample], instructions, max_text_len=10 ** 6)[0]
        if llm.is_encoder_decoder:
            labels = torch.tensor(llm._ids(continuation))
            logits = logits[: len(labels)]
        else:
            n_soft = model.vpg.num_prompts(model.vision.num_tokens)
            _, _, labels, _ = llm._sequences(n_soft, [sample], 10 ** 6, True, False)
            labels, logits = labels[0, 1:], logits[:-1]
            keep = labels != IGNORE
            labels, logits = labels[keep][:-1], logits[keep][:-1]  # the last label is the EOS vpgtrans appends
        logp = torch.log_softmax(logits.float(), -1)
        total = float(logp.gather(-1, labels.to(logp.device)[:, None]).sum())
        return total, bool((logits.argmax(-1).cpu() == labels).all())

    def generate_until_multi_round(self, requests: list[Any]) -> list[str]:
        """Not supported: vpgtrans models answer one turn about one image."""
        raise NotImplementedError("vpgtrans models answer one turn about one image")


# --- local tasks over vpgtrans eval data ----------------------------------------------------------
def doc_to_visual(doc: dict[str, Any]) -> list[Any]:
    """The doc's image, opened as vpgtrans eval opens it."""
    from .images import open_image

    return [open_image(doc["image"])]


def doc_to_text(doc: dict[str, Any]) -> str:
    """The instruction vpgtrans eval gives: empty for captions, the question prompt for VQA."""
    return doc["prompt"]


def process_caption(doc: dict[str, Any], results: Sequence[str]) -> dict[str, Any]:
    """Keep prediction and references: CIDEr is a corpus score (IDF over all references)."""
    return {"cider": {"prediction": results[0].strip(), "references": doc["captions"]}}


def aggregate_cider(items: Sequence[dict[str, Any]]) -> float:
    """Corpus CIDEr-D, exactly as `vpgtrans eval` computes it."""
    return cider([i["prediction"] for i in items], [i["references"] for i in items])


def process_vqa(doc: dict[str, Any], results: Sequence[str]) -> dict[str, float]:
    """VQA accuracy of one answer, as `vpgtrans eval` scores it."""
    return {"vqa_accuracy": vqa_score(results[0].strip(), doc["answers"])}


_UTILS = """# Written by vpgtrans.lmms_eval_plugin.write_task: the metrics are vpgtrans eval's own.
from vpgtrans.lmms_eval_plugin import (aggregate_cider, doc_to_text, doc_to_visual,  # noqa: F401
                                       process_caption, process_vqa)
"""


def write_task(data: str | Path, out: str | Path, task: str = "caption", name: str | None = None,
               limit: int | None = None, prompt: str | None = None, max_new_tokens: int = 30,
               num_beams: int = 1) -> Path:
    """Write an lmms-eval task (YAML + JSONL docs + utils.py) over a vpgtrans eval file; returns the YAML path."""
    from .data import ImageReader
    from .evaluation import _answers, _references, load_eval_records

    records = load_eval_records(data, task, limit)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    name = name or f"vpgtrans_{Path(str(data)).stem}_{task}".replace("-", "_").replace(".", "_")
    reader = ImageReader()
    docs = []
    for i, rec in enumerate(records):
        image = rec["image"] if rec.get("archive") is None else None
        path = Path(image) if image is not None else None
        if path is None or not path.is_file():  # shard members and in-memory images: write them out once
            path = out / "images" / f"{i:06d}.png"
            path.parent.mkdir(exist_ok=True)
            reader.decode(dict(rec)).save(path)
        doc = {"id": i, "image": str(path.resolve())}
        if task == "vqa":
            doc.update(prompt=_question_prompt(DEFAULT_VQA_PROMPT if prompt is None else prompt, rec["question"]),
                       answers=_answers(rec, i))
        else:
            doc.update(prompt=prompt or "", captions=_references(rec, i))
        docs.append(doc)
    (out / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (out / "utils.py").write_text(_UTILS)
    metric = ("  - metric: vqa_accuracy\n    aggregation: mean\n    higher_is_better: true\n" if task == "vqa" else
              "  - metric: cider\n    aggregation: !function utils.aggregate_cider\n    higher_is_better: true\n")
    process = "process_vqa" if task == "vqa" else "process_caption"
    yaml = (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
            f"    test: {json.dumps(str((out / f'{name}.jsonl').resolve()))}\n"
            "test_split: test\noutput_type: generate_until\n"
            "doc_to_visual: !function utils.doc_to_visual\ndoc_to_text: !function utils.doc_to_text\n"
            f"doc_to_target: {'answers' if task == 'vqa' else 'captions'}\n"
            f"generation_kwargs:\n  max_new_tokens: {max_new_tokens}\n  num_beams: {num_beams}\n  do_sample: false\n"
            f"process_results: !function utils.{process}\nmetric_list:\n{metric}")
    (out / f"{name}.yaml").write_text(yaml)
    return out / f"{name}.yaml"


def _main(argv: Sequence[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m vpgtrans.lmms_eval_plugin",
                                     description="Write a local lmms-eval task over a vpgtrans eval file.")
    parser.add_argument("--data", required=True, help="what `vpgtrans eval --data` reads")
    parser.add_argument("--task", choices=["caption", "vqa"], default="caption")
    parser.add_argument("--out", required=True, help="folder for the task (pass it to lmms-eval --include_path)")
    parser.add_argument("--name", default=None, help="task name (default vpgtrans_<file>_<task>)")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--prompt", default=None)
    parser.add_argument("--max-new-tokens", type=int, default=30)
    parser.add_argument("--beams", type=int, default=1)
    args = parser.parse_args(argv)
    path = write_task(args.data, args.out, args.task, args.name, args.limit, args.prompt, args.max_new_tokens,
                      args.beams)
    print(f"wrote {path}: lmms-eval --model vpgtrans --model_args pretrained=MODEL_DIR --tasks {path.stem} "
          f"--include_path {path.parent}")


if __name__ == "__main__":
    _main()
