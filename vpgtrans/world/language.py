"""The world's wider language: synonyms, paraphrases, a lexicon, attribute lists and counting.

Image captions stay canonical (``a large red circle``), but the LMs' pretraining text uses many
more words for the same meanings, the way real text does: synonyms (``crimson``, ``big``, ``disc``),
capitalised forms at the start of a sentence or in lists, number words and digits, definitions and
opposites. A word's input embedding is then shaped by what it *means* in many contexts, not only by
the handful of caption templates it occurs in, and every caption word has relatives whose embeddings
say where it should sit: what lets a converter fitted on some tokens map the others (docs/design.md#measuring-transfer).
"""

from __future__ import annotations

import functools
import random
from typing import Any, NamedTuple

SYNONYMS: dict[str, tuple[str, ...]] = {
    # colours
    "red": ("crimson", "scarlet"), "green": ("emerald", "jade"), "blue": ("azure", "navy"),
    "yellow": ("golden", "lemon"), "purple": ("violet", "lilac"), "orange": ("amber", "tangerine"),
    "white": ("ivory", "snowy"), "cyan": ("teal", "turquoise"),
    # shapes
    "circle": ("disc", "round"), "square": ("box", "block"), "triangle": ("wedge", "trigon"),
    "diamond": ("rhombus", "lozenge"), "cross": ("plus", "cruciform"), "star": ("starburst", "asterisk"),
    "ring": ("hoop", "loop"), "hexagon": ("hex", "honeycomb"),
    # sizes
    "small": ("tiny", "little"), "medium": ("moderate", "average"), "large": ("big", "huge"),
    # places and relations
    "top": ("upper", "high"), "bottom": ("lower", "low"), "center": ("middle", "centre"),
    "left": ("west",), "right": ("east",), "above": ("over",), "below": ("under", "beneath"),
    # the rest of the caption vocabulary
    "picture": ("image", "photo"), "shows": ("depicts", "contains"), "shapes": ("objects", "figures"),
    "single": ("lone", "solitary"), "with": ("beside", "alongside"), "there": ("here",),
    "is": ("sits",), "are": ("sit",), "and": ("also",), "one": ("1",), "two": ("2",), "three": ("3",),
}
# The words of the colours and shapes past the first 8 (scene.COLORS, scene.SHAPES); a world that does not use
# them never sees them, so the default world's text and tokenizers do not depend on this table.
EXTRA_SYNONYMS: dict[str, tuple[str, ...]] = {
    "pink": ("rose", "blush"), "brown": ("chocolate", "tan"), "gray": ("grey", "silver"),
    "lime": ("chartreuse", "neon"), "magenta": ("fuchsia", "cerise"), "maroon": ("burgundy", "wine"),
    "olive": ("khaki", "mossy"), "beige": ("cream", "sand"),
    "pentagon": ("pentad", "fivegon"), "semicircle": ("halfdisc", "dome"), "crescent": ("moon", "sickle"),
    "oval": ("ellipse", "egg"), "bar": ("stripe", "rod"), "trapezoid": ("trapezium", "frustum"),
    "arrow": ("pointer", "dart"), "frame": ("outline", "border"),
}
EXTRA_CORNERS: dict[str, str] = {"pentagon": "five", "semicircle": "two", "crescent": "two", "oval": "zero",
                                 "bar": "four", "trapezoid": "four", "arrow": "seven", "frame": "eight"}
CATEGORIES: dict[str, tuple[str, ...]] = {
    "colors": ("red", "green", "blue", "yellow", "purple", "orange", "white", "cyan"),
    "shapes": ("circle", "square", "triangle", "diamond", "cross", "star", "ring", "hexagon"),
    "sizes": ("small", "medium", "large"),
    "places": ("top", "bottom", "left", "right", "center"),
}
OPPOSITES: tuple[tuple[str, str], ...] = (("small", "large"), ("top", "bottom"), ("left", "right"),
                                          ("above", "below"), ("yes", "no"), ("white", "black"))
NUMBERS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                            "eleven", "twelve")
CORNERS: dict[str, str] = {"triangle": "three", "square": "four", "diamond": "four", "hexagon": "six",
                           "star": "ten", "cross": "twelve", "circle": "zero", "ring": "zero"}
PARAPHRASE_PROMPT = "In other words:"
LIST_PROMPT = "List the shapes:"
LEXICON_TEMPLATES: tuple[str, ...] = (
    "{s} means {c}.", "{c} and {s} mean the same.", "{s} is another word for {c}.",
    "a {s} thing is a {c} thing.", "{S} means {c}.",
)


class _Tables(NamedTuple):
    synonyms: dict[str, tuple[str, ...]]
    categories: dict[str, tuple[str, ...]]
    corners: dict[str, str]


def _tables(voc: dict[str, list[str]] | None) -> _Tables:
    """The lexicon's tables for a world vocabulary: the base ones plus its colours and shapes past the first 8."""
    extra = tuple(tuple(w for w in (voc or {}).get(key, []) if w in EXTRA_SYNONYMS) for key in ("colors", "shapes"))
    return _tables_for(*extra)


@functools.lru_cache(maxsize=16)
def _tables_for(colors: tuple[str, ...], shapes: tuple[str, ...]) -> _Tables:
    # Built once per vocabulary, not once per sentence: the LMs' pretraining text asks for thousands of sentences.
    return _Tables(synonyms={**SYNONYMS, **{w: EXTRA_SYNONYMS[w] for w in colors + shapes}},
                   categories={**CATEGORIES, "colors": CATEGORIES["colors"] + colors,
                               "shapes": CATEGORIES["shapes"] + shapes},
                   corners={**CORNERS, **{w: EXTRA_CORNERS[w] for w in shapes if w in EXTRA_CORNERS}})


def lexicon_words(voc: dict[str, list[str]] | None = None) -> set[str]:
    """Every word the wider language adds to the captions' (each must be one token in every tokenizer)."""
    words = {w for syns in _tables(voc).synonyms.values() for w in syns if w.isalpha()}
    words.update(NUMBERS)
    words.update("means mean same another word for thing opposite of black corners has colors sizes "
                 "places in other words list count after comes".split())
    return words


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def swap_words(text: str, rng: random.Random, p: float) -> str:
    """`text` with each word that has synonyms replaced by one of them with probability `p`."""
    out = []
    for word in text.split(" "):
        core, tail = (word[:-1], word[-1]) if word[-1:] in ".,:?" else (word, "")
        syns = SYNONYMS.get(core) or EXTRA_SYNONYMS.get(core)  # extra words occur only in worlds that use them
        if syns and rng.random() < p:
            core = rng.choice(syns)
        if out and out[-1] in ("a", "an", "A", "An"):  # the article follows the word now after it
            out[-1] = out[-1][0] + ("n" if core[:1] in "aeiou" else "")
        out.append(core + tail)
    return " ".join(out)


def varied_context(ctx: str, rng: random.Random, p: float = 0.3) -> str:
    """The attribute context with some words said otherwise (the caption to predict stays canonical)."""
    return swap_words(ctx, rng, p)


def paraphrase(caption: str, rng: random.Random) -> str:
    """A caption said with other words, sometimes capitalised like the start of a sentence."""
    text = swap_words(caption, rng, 0.5)
    return _cap(text) if rng.random() < 0.5 else text


def attribute_list(scene: dict[str, Any], rng: random.Random) -> str:
    """'Red Circle: small, top left. Blue Square: large, center.' (objects in random order)."""
    objs = rng.sample(scene["objects"], len(scene["objects"]))
    return " ".join(f"{_cap(o['color'])} {_cap(o['shape'])}: {o['size']}, {o['position']}." for o in objs)


def lexicon_sentence(rng: random.Random, voc: dict[str, list[str]] | None = None) -> str:
    """One context-free sentence of world knowledge: a definition, a list, an opposite or counting."""
    synonyms, categories, corners = _tables(voc)
    kind = rng.randrange(6)
    if kind <= 1:
        canon = rng.choice(sorted(synonyms))
        syn = rng.choice(synonyms[canon])
        text = rng.choice(LEXICON_TEMPLATES).format(s=syn, c=canon, S=_cap(syn))
    elif kind == 2:
        name = rng.choice(sorted(categories))
        items = [w if rng.random() < 0.6 else rng.choice(synonyms.get(w, (w,))) for w in categories[name]]
        items = items if name == "sizes" else rng.sample(items, rng.randint(2, len(items)))
        text = f"{name}: " + ", ".join(items) + "."
    elif kind == 3:
        a, b = rng.choice(OPPOSITES)
        a, b = (a, b) if rng.random() < 0.5 else (b, a)
        text = f"{a} is the opposite of {b}."
    elif kind == 4:
        start = rng.randrange(len(NUMBERS) - 3)
        span = NUMBERS[start:start + rng.randint(3, len(NUMBERS) - start)]
        digits = rng.random() < 0.3
        text = ", ".join(str(NUMBERS.index(n)) if digits else n for n in span) + "."
        if rng.random() < 0.3:
            k = rng.randrange(len(NUMBERS) - 1)
            text = f"after {NUMBERS[k]} comes {NUMBERS[k + 1]}."
    else:
        shape = rng.choice(sorted(corners))
        name = shape if rng.random() < 0.6 else rng.choice(synonyms[shape])
        text = f"a {name} has {corners[shape]} corners."
    return _cap(text) if rng.random() < 0.3 else text
