"""Tiny real-architecture models, written with `save_pretrained`, for tests and smoke runs.

Each model is a genuine transformers class (OPT, LLaMA, T5, BLIP-2 ViT, CLIP ViT, BERT) at toy size,
with its own tokenizer, saved to disk and loaded back through the same path a user's 7B model takes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

WORDS = ("a an the red green blue yellow purple orange black white circle square triangle star small large "
         "big tiny left right above below of to on in picture photo image shows there is are two one three "
         "shape object next near far top bottom center describe this what colour color answer question "
         "dog cat sky tree house car person man woman and with has it").split()


def _corpus() -> list[str]:
    import random

    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(400)]
    return lines + [" ".join(WORDS)]


def _bpe_bytelevel():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer)
    return tok, dict(bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


def _sentencepiece_bpe():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=260, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator(_corpus(), trainer)
    return tok, dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _unigram_t5():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=200, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>")
    tok.train_from_iterator(_corpus(), trainer)
    return tok, dict(eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


def _wordpiece_bert():
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=220, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tok.train_from_iterator(_corpus(), trainer)
    return tok, dict(pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


def _save_tokenizer(raw, specials: dict[str, str], out: Path):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=raw, **specials)
    tok.save_pretrained(out)
    return tok


def _preprocessor(out: Path, size: int) -> None:
    (out / "preprocessor_config.json").write_text(json.dumps({
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "size": {"height": size, "width": size},
        "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True}))


def make_tiny_models(root: str | Path, width: int = 32) -> dict[str, Path]:
    """Write tiny OPT, OPT-m (wider), LLaMA, T5, BLIP-2 ViT, CLIP ViT and BERT checkpoints under `root`."""
    from transformers import (BertConfig, BertModel, Blip2VisionConfig, Blip2VisionModel, CLIPVisionConfig,
                              CLIPVisionModel, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM, T5Config,
                              T5ForConditionalGeneration)

    root = Path(root)
    paths = {n: root / n for n in ("opt", "opt-m", "llama", "t5", "blip2-vit", "clip-vit", "bert")}
    if all((p / "config.json").exists() for p in paths.values()):
        return paths
    small = dict(num_hidden_layers=2, num_attention_heads=4)

    raw, sp = _bpe_bytelevel()
    for name, hidden in (("opt", width), ("opt-m", width * 2)):
        tok = _save_tokenizer(raw, sp, paths[name])
        torch.manual_seed(1)
        OPTForCausalLM(OPTConfig(vocab_size=len(tok), hidden_size=hidden, ffn_dim=hidden * 2, word_embed_proj_dim=hidden,
                                 max_position_embeddings=256, pad_token_id=tok.pad_token_id,
                                 bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **small)
                       ).save_pretrained(paths[name])

    raw, sp = _sentencepiece_bpe()
    tok = _save_tokenizer(raw, sp, paths["llama"])
    torch.manual_seed(2)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=width, intermediate_size=width * 2,
                                 num_key_value_heads=2, max_position_embeddings=256, bos_token_id=tok.bos_token_id,
                                 eos_token_id=tok.eos_token_id, **small)).save_pretrained(paths["llama"])

    raw, sp = _unigram_t5()
    tok = _save_tokenizer(raw, sp, paths["t5"])
    torch.manual_seed(3)
    T5ForConditionalGeneration(T5Config(vocab_size=len(tok), d_model=width, d_ff=width * 2, d_kv=8, num_layers=2,
                                        num_heads=4, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                        decoder_start_token_id=tok.pad_token_id)).save_pretrained(paths["t5"])

    # Blip2VisionConfig defaults to initializer_range=1e-10 (real weights are always pretrained): set a real one.
    vis = dict(hidden_size=width, intermediate_size=width * 2, image_size=32, patch_size=8, initializer_range=0.02,
               **small)
    torch.manual_seed(4)
    Blip2VisionModel(Blip2VisionConfig(**vis)).save_pretrained(paths["blip2-vit"])
    _preprocessor(paths["blip2-vit"], 32)
    torch.manual_seed(5)
    CLIPVisionModel(CLIPVisionConfig(**vis)).save_pretrained(paths["clip-vit"])
    _preprocessor(paths["clip-vit"], 32)

    raw, sp = _wordpiece_bert()
    from transformers import BertTokenizerFast

    tok = BertTokenizerFast(tokenizer_object=raw, **sp)
    tok.save_pretrained(paths["bert"])
    torch.manual_seed(6)
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=width, intermediate_size=width * 2,
                         max_position_embeddings=128, **small)).save_pretrained(paths["bert"])
    return paths


def tiny_spec(paths: dict[str, Path], llm: str = "opt", vision: str = "blip2-vit", vpg: str = "qformer",
              **vpg_config) -> dict:
    """A ModelSpec dict wiring tiny components together (a small Q-Former by default)."""
    llm_names = {"opt": "opt", "opt-m": "opt", "llama": "llama", "t5": "flant5"}
    vpg_cfg = {"name": vpg}
    if vpg in ("qformer", "instruct-qformer"):
        vpg_cfg.update(num_query_tokens=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=64, dropout=0.0)
    vpg_cfg.update(vpg_config)
    return {"vision": {"name": vision, "path": str(paths[vision])}, "vpg": vpg_cfg,
            "llm": {"name": llm_names[llm], "path": str(paths[llm])}}


def tiny_images(n: int = 2, size: int = 40, seed: int = 0) -> list:
    """A few random RGB PIL images."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def write_caption_set(root: str | Path, n: int, seed: int, captions: list[str]) -> Path:
    """Write `n` random images under `root/img` and a `train.jsonl` cycling through `captions`; returns that file."""
    root = Path(root)
    (root / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, im in enumerate(tiny_images(n, seed=seed)):
        im.save(root / "img" / f"{i}.png")
        rows.append({"image": f"img/{i}.png", "caption": captions[i % len(captions)]})
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "train.jsonl"


def kill_at_first_checkpoint(victim, out: str | Path, timeout: float = 120.0):
    """Start a thread that SIGKILLs the `victim` process once `out/checkpoints/latest` exists (the kill -9 tests)."""
    import signal
    import threading
    import time

    latest = Path(out) / "checkpoints" / "latest"

    def watch() -> None:
        deadline = time.time() + timeout
        while not latest.exists() and victim.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        victim.send_signal(signal.SIGKILL)

    killer = threading.Thread(target=watch)
    killer.start()
    return killer
