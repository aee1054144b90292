"""Where an LLM's prediction forms and where its attention sink sits — what sizes a surrogate (arXiv 2505.22664).

    python benchmarks/logit_lens.py [--llm smollm2-135m] [--texts 120]

On easy-vqa `Question: … Answer: …` lines: for every layer l, the top-1 agreement of lm_head(norm(h_l)) with the
LLM's final prediction and KL(final ‖ layer l) (the logit lens), and the mean hidden-state norm at position 0
against the other positions (a massive activation there is the attention sink). The paper keeps the layers
before the late phase, where the read-out starts to agree with the final prediction.
"""

from __future__ import annotations

import argparse
import sys

import torch


def trajectory(llm: str, texts: list[str]) -> list[dict[str, float]]:
    """Per layer: agreement with the final prediction, KL to it, |h| at position 0 and elsewhere."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vpgtrans.surrogate import final_norm, resolve_llm

    path, _ = resolve_llm(llm)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"  # position 0 is every text's first token
    enc = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**enc, output_hidden_states=True)
    mask = enc.attention_mask.bool()
    final = out.logits[mask].log_softmax(-1)
    norm, head, rows = final_norm(model), model.get_output_embeddings(), []
    for layer, h in enumerate(out.hidden_states[:-1]):  # the last entry is already normed: it is the final
        with torch.no_grad():
            lens = head(norm(h))[mask].log_softmax(-1)
        sizes = h.norm(dim=-1)
        rows.append({"layer": layer, "agreement": float((lens.argmax(-1) == final.argmax(-1)).float().mean()),
                     "kl": float((final.exp() * (final - lens)).sum(-1).mean()),
                     "norm_pos0": float(sizes[:, 0].mean()), "norm_rest": float(sizes[:, 1:][mask[:, 1:]].mean())})
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    """Command line entry: prints one line per layer."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--llm", default="smollm2-135m", help="alias, directory or .gguf of a decoder-only LLM")
    p.add_argument("--texts", type=int, default=120, help="easy-vqa question+answer lines to read")
    args = p.parse_args(argv)
    from vpgtrans.data.easy_vqa import read_easy_vqa

    lines = list(dict.fromkeys(f"{r['prompt']} {r['answer']}" for r in read_easy_vqa("train", 4 * args.texts)))
    rows = trajectory(args.llm, lines[:args.texts])
    print(f"{args.llm} on {min(len(lines), args.texts)} easy-vqa lines: layer, top-1 agreement with the final "
          "prediction, KL, |h| at position 0 / elsewhere")
    for r in rows:
        print(f"  {r['layer']:3d}  {r['agreement']:.3f}  {r['kl']:7.2f}  {r['norm_pos0']:9.1f} / {r['norm_rest']:.1f}")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
