"""Token pairing across real-architecture tokenizers (byte-level BPE, SentencePiece-style, WordPiece)."""

from __future__ import annotations

import random

import pytest

from vpgtrans.errors import VpgtransError
from vpgtrans.transfer.pairing import TokenPairingError, pair_tokens, pair_tokens_positional

COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white"]
SHAPES = ["cube", "ball", "cone", "ring", "star", "disk", "café"]
RELATIONS = ["left of", "right of", "above", "below", "next to"]


def _texts() -> list[str]:
    rng = random.Random(0)
    lines = [f"a {rng.choice(COLOURS)} {rng.choice(SHAPES)} is {rng.choice(RELATIONS)} the "
             f"{rng.choice(COLOURS)} {rng.choice(SHAPES)}." for _ in range(300)]
    return lines + ["Red cube. Blue ball. The café shows"] * 20


def _train(kind: str):
    """A tiny tokenizer of the given architecture, trained on the captions above."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "bytelevel":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>", "<pad>"], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        specials = dict(bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    elif kind == "sentencepiece":
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
        trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
        specials = dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    else:
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=False)
        tok.pre_tokenizer, tok.decoder = pre_tokenizers.BertPreTokenizer(), decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=200, special_tokens=["[UNK]", "[CLS]", "[SEP]", "[PAD]"],
                                            show_progress=False)
        specials = dict(unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]")
    tok.train_from_iterator(_texts(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **specials)


@pytest.fixture(scope="module")
def toks():
    return {kind: _train(kind) for kind in ("bytelevel", "sentencepiece", "wordpiece")}


def _partner(pairs, src_tok, dst_tok) -> dict[str, str]:
    """Source token string → destination token string."""
    return dict(zip(src_tok.convert_ids_to_tokens(pairs.src_ids.tolist()),
                    dst_tok.convert_ids_to_tokens(pairs.dst_ids.tolist())))


def test_same_vocabulary_is_identity(toks, tmp_path):
    bpe = toks["bytelevel"]
    bpe.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    for other in (bpe, AutoTokenizer.from_pretrained(tmp_path)):
        pairs = pair_tokens(bpe, other)
        assert pairs.method == "identity"
        assert pairs.src_ids.tolist() == pairs.dst_ids.tolist() == list(range(len(bpe)))
        assert pairs.src_coverage == pairs.dst_coverage == 1.0


def test_bytelevel_to_sentencepiece_pairs_the_same_words(toks):
    bpe, sp = toks["bytelevel"], toks["sentencepiece"]
    pairs = pair_tokens(bpe, sp)
    partner = _partner(pairs, bpe, sp)
    for word in ("red", "blue", "cube", "ball"):
        assert partner["\u0120" + word] == "\u2581" + word  # word start ↔ word start
    # Byte-level tokens are bytes: 'é' is two of them, and must be turned back into text to match.
    assert "\u0120caf\u00c3\u00a9" in bpe.get_vocab() and partner["\u0120caf\u00c3\u00a9"] == "\u2581caf\u00e9"
    # Continuation pieces pair with continuation pieces only.
    assert all(not d.startswith("\u2581") for s, d in partner.items() if not s.startswith("\u0120"))
    special = set(bpe.all_special_ids) | set(sp.all_special_ids)
    assert not special & (set(pairs.src_ids.tolist()) | set(pairs.dst_ids.tolist()))
    assert pairs.n_pairs == len(pairs.src_ids) == len(pairs.dst_ids) > 30
    assert pairs.dst_coverage == pytest.approx(len(set(pairs.dst_ids.tolist())) / len(sp))
    assert pairs.src_coverage == pytest.approx(len(set(pairs.src_ids.tolist())) / len(bpe))
    assert 0 < pairs.src_coverage < pairs.dst_coverage < 1
    assert f"{pairs.n_pairs} token pairs" in pairs.summary() and f"{pairs.dst_coverage:.1%}" in pairs.summary()


def test_wordpiece_continuations_and_word_starts(toks):
    wp, sp = toks["wordpiece"], toks["sentencepiece"]
    partner = _partner(pair_tokens(wp, sp), wp, sp)
    assert partner["red"] == "\u2581red" and partner["cube"] == "\u2581cube"
    continued = {s: d for s, d in partner.items() if s.startswith("##")}
    assert continued and all(d == s[2:] for s, d in continued.items())


def test_case_policy(toks):
    wp, sp = toks["wordpiece"], toks["sentencepiece"]  # the WordPiece vocabulary is lower-cased
    strict = _partner(pair_tokens(wp, sp), wp, sp)
    folded = pair_tokens(wp, sp, case="insensitive")
    by_dst = dict(zip(sp.convert_ids_to_tokens(folded.dst_ids.tolist()),
                      wp.convert_ids_to_tokens(folded.src_ids.tolist())))
    assert "\u2581Red" not in strict.values()
    assert by_dst["\u2581Red"] == "red" and by_dst["\u2581red"] == "red"
    assert folded.n_pairs > len(strict) and folded.details["case_folded"] == folded.n_pairs - len(strict)


def test_deterministic(toks):
    a = pair_tokens(toks["sentencepiece"], toks["bytelevel"])
    b = pair_tokens(toks["sentencepiece"], toks["bytelevel"])
    assert a.src_ids.tolist() == b.src_ids.tolist() and a.dst_ids.tolist() == b.dst_ids.tolist()
    assert a.dst_ids.tolist() == sorted(a.dst_ids.tolist())


def test_refuses_below_minimum_coverage(toks):
    with pytest.raises(TokenPairingError) as info:
        pair_tokens(toks["sentencepiece"], toks["bytelevel"], min_coverage=0.9)
    msg = str(info.value)
    assert isinstance(info.value, VpgtransError) and "\n" not in msg
    assert "token pairs" in msg and "%" in msg and "pair_tokens_positional" in msg and "--min-coverage" in msg
    with pytest.raises(TokenPairingError):
        pair_tokens(toks["sentencepiece"], toks["bytelevel"], case="upper")


def test_positional_pairing_for_comparison(toks):
    bpe, sp = toks["bytelevel"], toks["sentencepiece"]
    texts = [t.rstrip(".") for t in _texts()[:100]] + _texts()  # the full stop splits differently
    pairs = pair_tokens_positional(bpe, sp, texts)
    kept = sum(len(bpe.tokenize(t)) == len(sp.tokenize(t)) for t in texts)
    assert pairs.method == "positional" and pairs.details["texts_kept"] == f"{kept}/{len(texts)}"
    assert 0 < kept < len(texts) and pairs.n_pairs == len(set(zip(pairs.src_ids.tolist(), pairs.dst_ids.tolist())))
    with pytest.raises(TokenPairingError):
        pair_tokens_positional(bpe, sp, texts, min_coverage=0.99)


def test_saved_llm_tokenizers(tiny_paths):
    """Tokenizers of the tiny OPT and LLaMA checkpoints, loaded back the way a user's are."""
    from transformers import AutoTokenizer

    opt, llama = (AutoTokenizer.from_pretrained(tiny_paths[k]) for k in ("opt", "llama"))
    pairs = pair_tokens(opt, llama, min_coverage=0.1)
    partner = _partner(pairs, opt, llama)
    assert partner["\u0120the"] == "\u2581the"
    assert pairs.dst_coverage > 0.1


def test_unpaired_tokens_are_listed(toks):
    bpe, sp = toks["bytelevel"], toks["sentencepiece"]
    pairs = pair_tokens(bpe, sp)
    lone_src, lone_dst = set(pairs.src_unpaired.tolist()), set(pairs.dst_unpaired.tolist())
    assert lone_src and lone_dst
    assert not lone_src & set(pairs.src_ids.tolist()) and not lone_dst & set(pairs.dst_ids.tolist())
    # Specials and byte-fallback pieces have no string to pair: they are neither paired nor unpaired.
    special = set(sp.all_special_ids)
    assert not special & lone_dst
    names = set(sp.convert_ids_to_tokens(sorted(lone_dst)))
    assert not any(n.startswith("<0x") for n in names)


def test_restrict_to_texts_keeps_the_tokens_that_occur(toks):
    from vpgtrans.transfer.pairing import restrict_to_texts

    bpe, sp = toks["bytelevel"], toks["sentencepiece"]
    pairs = pair_tokens(bpe, sp)
    texts = ["a red cube is above the blue ball."] * 3
    kept = restrict_to_texts(pairs, bpe, sp, texts, min_pairs=3)
    words = set(sp.convert_ids_to_tokens(kept.dst_ids.tolist()))
    assert {"\u2581red", "\u2581blue", "\u2581the", "\u2581above"} <= words
    assert "\u2581green" not in words and "\u2581cone" not in words
    assert kept.n_pairs == len(kept.src_ids) < pairs.n_pairs and "occur in 3 texts" in kept.summary()
    assert kept.dst_coverage == pairs.dst_coverage  # coverage stays that of the string match
    seen = set(sp(texts[0], add_special_tokens=False).input_ids)
    assert set(kept.dst_unpaired.tolist()) <= seen
    # Too few pairs in the texts: nothing is dropped, and the details say why.
    unchanged = restrict_to_texts(pairs, bpe, sp, ["red"], min_pairs=16)
    assert unchanged.n_pairs == pairs.n_pairs and "all pairs kept" in unchanged.details["in_texts"]


def test_transfer_fits_on_every_pair_when_the_text_pairs_cannot_determine_the_map(toks, tmp_path):
    """Text tokens are kept only when they number twice the map's unknowns per output (embed_dim + 1)."""
    import json
    from types import SimpleNamespace

    from vpgtrans.data import load_records
    from vpgtrans.data.dataset import DataConfig
    from vpgtrans.transfer.pairing import converter_pairs

    bpe, sp = toks["bytelevel"], toks["sentencepiece"]
    (tmp_path / "x.png").write_bytes(b"")
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"image": "x.png", "caption": t}) + "\n" for t in _texts()))
    records = load_records(DataConfig(train=str(train)), "train")
    dst = SimpleNamespace(tokenizer=sp)
    every = pair_tokens(bpe, sp)
    narrow = converter_pairs(SimpleNamespace(tokenizer=bpe, embed_dim=8), dst, records)
    assert 16 <= narrow.n_pairs < every.n_pairs  # a determined fit: the text's tokens only
    wide = converter_pairs(SimpleNamespace(tokenizer=bpe, embed_dim=narrow.n_pairs), dst, records)
    assert wide.n_pairs == every.n_pairs and "all pairs kept" in wide.details["in_texts"]
    # Barely more text pairs than unknowns is not enough: least squares would all but interpolate them.
    barely = converter_pairs(SimpleNamespace(tokenizer=bpe, embed_dim=narrow.n_pairs - 3), dst, records)
    assert barely.n_pairs == every.n_pairs and "all pairs kept" in barely.details["in_texts"]
    twice = converter_pairs(SimpleNamespace(tokenizer=bpe, embed_dim=narrow.n_pairs // 2 - 1), dst, records)
    assert twice.n_pairs == narrow.n_pairs
