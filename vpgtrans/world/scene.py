"""Scenes of the synthetic world and their text: captions, VQA pairs and the LM 'context'.

A scene is 1-3 objects, each with a shape, colour, size and a cell of a 3x3 grid; no two objects
share a cell, a shape or a colour (so "the circle" and "the red object" are unambiguous). Captions
come from several templates; multi-object captions state a spatial relation in part of the data.

The *context* of a scene is its attribute words (``"small red circle top left , large blue
square center"``, objects in random order). The world's LMs are pretrained to read it before
the text they predict, so that later a VPG's soft prompts can take its place.
"""

from __future__ import annotations

from typing import Any

import random

from .config import WorldConfig

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 90, 235), "yellow": (235, 220, 50),
    "purple": (150, 60, 200), "orange": (245, 140, 30), "white": (240, 240, 240), "cyan": (40, 210, 220),
    # Used only when num_colors > 8; several sit close to a colour above (perception that takes samples to learn).
    "pink": (250, 150, 190), "brown": (140, 85, 40), "gray": (150, 150, 150), "lime": (170, 240, 50),
    "magenta": (230, 40, 180), "maroon": (125, 25, 45), "olive": (125, 125, 25), "beige": (225, 205, 160),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross", "star", "ring", "hexagon",
                           # used only when num_shapes > 8
                           "pentagon", "semicircle", "crescent", "oval", "bar", "trapezoid", "arrow", "frame")
SIZES: dict[str, float] = {"small": 0.10, "medium": 0.135, "large": 0.17}  # radius / image side
SIZE_ORDER: tuple[str, ...] = ("small", "large", "medium")  # num_sizes=2 keeps the clearest pair
# 3x3 grid cells, row-major: (row, col) -> name.
POSITIONS: tuple[str, ...] = ("top left", "top", "top right", "left", "center", "right",
                              "bottom left", "bottom", "bottom right")
POSITION_PHRASES: dict[str, str] = {
    "top left": "in the top left", "top": "at the top", "top right": "in the top right",
    "left": "on the left", "center": "in the center", "right": "on the right",
    "bottom left": "in the bottom left", "bottom": "at the bottom", "bottom right": "in the bottom right",
}
RELATIONS: tuple[str, ...] = ("to the left of", "to the right of", "above", "below")
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three")
VQA_PROMPT = "Question: {} Answer:"
# MiniGPT-4 stage-2 template pieces: the soft prompts go between BEFORE and AFTER.
MINIGPT4_BEFORE = "###Human: <Img>"
MINIGPT4_AFTER = "</Img> {} ###Assistant:"
MINIGPT4_END = "###"
INSTRUCTIONS: tuple[str, ...] = (
    "Describe this image in detail.", "Take a look at this image and describe what you notice.",
    "Please provide a detailed description of the picture.", "Could you describe the contents of this image for me?",
)

SPLIT_CODES = {"train": 1, "val": 2, "test": 3, "text": 4}


def vocabulary(cfg: WorldConfig) -> dict[str, list[str]]:
    """The attribute values this config uses."""
    return {"colors": list(COLORS)[: cfg.num_colors], "shapes": list(SHAPES[: cfg.num_shapes]),
            "sizes": list(SIZE_ORDER[: cfg.num_sizes])}


def rng_for(seed: int, split: str, index: int) -> random.Random:
    """An independent, reproducible generator per (seed, split, item) (string seeds hash stably)."""
    return random.Random(f"vpgtrans-world/{seed}/{SPLIT_CODES[split]}/{index}")


def _distinct(rng: random.Random, values: list[str], n: int, tail: float) -> list[str]:
    """`n` distinct values; with tail > 0 the k-th value is drawn with weight 1 / k**tail (Zipf: a long tail)."""
    if tail <= 0:
        return rng.sample(values, n)  # the uniform world draws exactly as before the knob existed
    left, weights, out = list(values), [1.0 / (k + 1) ** tail for k in range(len(values))], []
    for _ in range(n):
        i = rng.choices(range(len(left)), weights=weights)[0]
        out.append(left.pop(i))
        weights.pop(i)
    return out


def sample_scene(rng: random.Random, cfg: WorldConfig) -> dict[str, Any]:
    """Draw one scene: objects with distinct shapes, colours and grid cells."""
    voc = vocabulary(cfg)
    counts = list(range(cfg.min_objects, cfg.max_objects + 1))
    n = rng.choices(counts, weights=cfg.object_weights[cfg.min_objects - 1: cfg.max_objects])[0]
    cells = rng.sample(range(9), n)
    colors = _distinct(rng, voc["colors"], n, cfg.concept_tail)
    shapes = _distinct(rng, voc["shapes"], n, cfg.concept_tail)
    objects = []
    for k in range(n):
        cell = cells[k]
        objects.append({"shape": shapes[k], "color": colors[k], "size": rng.choice(voc["sizes"]),
                        "position": POSITIONS[cell], "row": cell // 3, "col": cell % 3})
    scene: dict[str, Any] = {"count": n, "objects": objects, "relation": None}
    # The relation (if any) is fixed per scene so every reference caption agrees on it.
    if n >= 2 and rng.random() < cfg.relation_share:
        i, j = rng.sample(range(n), 2)
        scene["relation"] = {"subject": i, "object": j, "relation": _relation(objects[i], objects[j], rng)}
    return scene


def _relation(a: dict[str, Any], b: dict[str, Any], rng: random.Random) -> str:
    options = []
    if a["col"] != b["col"]:
        options.append("to the left of" if a["col"] < b["col"] else "to the right of")
    if a["row"] != b["row"]:
        options.append("above" if a["row"] < b["row"] else "below")
    return rng.choice(options)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def noun_phrase(obj: dict[str, Any], article: str = "a") -> str:
    """'a small red circle' (article 'a' is turned into 'an' where English wants it)."""
    words = f"{obj['size']} {obj['color']} {obj['shape']}"
    if article == "a":
        article = _article(words)
    return f"{article} {words}"


def _located(obj: dict[str, Any]) -> str:
    return f"{noun_phrase(obj)} {POSITION_PHRASES[obj['position']]}"


def _single_templates(o: dict[str, Any]) -> list[str]:
    pos = POSITION_PHRASES[o["position"]]
    return [
        f"{noun_phrase(o)} {pos}.",
        f"there is {noun_phrase(o)} {pos}.",
        f"{pos} there is {noun_phrase(o)}.",
        f"the picture shows {noun_phrase(o)} {pos}.",
        f"{_article(o['color'])} {o['color']} {o['shape']} of {o['size']} size {pos}.",
        f"a single {o['size']} {o['color']} {o['shape']} {pos}.",
    ]


def _multi_templates(scene: dict[str, Any], order: list[int]) -> list[str]:
    objs = [scene["objects"][k] for k in order]
    n = len(objs)
    count = NUMBER_WORDS[n]
    rel = scene["relation"]
    if rel is not None:
        a, b = scene["objects"][rel["subject"]], scene["objects"][rel["object"]]
        r = rel["relation"]
        rest = [o for k, o in zip(order, objs) if k not in (rel["subject"], rel["object"])]
        tail = "".join(f", and {_located(o)}" for o in rest)
        return [
            f"{noun_phrase(a)} {r} {noun_phrase(b)}{tail}.",
            f"there is {noun_phrase(a)} {r} {noun_phrase(b)}{tail}.",
            f"{noun_phrase(a, 'the')} is {r} {noun_phrase(b, 'the')}{tail}.",
            f"{count} shapes: {noun_phrase(a)} {r} {noun_phrase(b)}{tail}.",
            f"{noun_phrase(b)} with {noun_phrase(a)} {r} it{tail}.",
        ]
    listed = ", ".join(_located(o) for o in objs[:-1]) + f" and {_located(objs[-1])}"
    plain = ", ".join(noun_phrase(o) for o in objs[:-1]) + f" and {noun_phrase(objs[-1])}"
    return [
        f"{listed}.",
        f"there are {count} shapes: {listed}.",
        f"{count} shapes, {listed}.",
        f"the picture shows {listed}.",
        f"{count} shapes: {plain}, " + ", ".join(f"the {o['shape']} {POSITION_PHRASES[o['position']]}"
                                                   for o in objs) + ".",
    ]


def captions(scene: dict[str, Any], rng: random.Random, k: int) -> list[str]:
    """`k` reference captions from different templates (object order drawn per caption)."""
    n = scene["count"]
    out: list[str] = []
    template_ids = None
    for _ in range(k):
        order = rng.sample(range(n), n)
        options = _single_templates(scene["objects"][0]) if n == 1 else _multi_templates(scene, order)
        if template_ids is None:
            template_ids = rng.sample(range(len(options)), len(options))
        out.append(options[template_ids[len(out) % len(options)]])
    return out


def qa_pairs(scene: dict[str, Any], rng: random.Random, cfg: WorldConfig) -> list[tuple[str, str]]:
    """Every VQA pair of the scene: colour, shape, size, position, count, existence, relation."""
    voc = vocabulary(cfg)
    objs = scene["objects"]
    pairs: list[tuple[str, str]] = [("how many shapes are there?", NUMBER_WORDS[scene["count"]])]
    for o in objs:
        pairs += [(f"what color is the {o['shape']}?", o["color"]),
                  (f"what shape is the {o['color']} object?", o["shape"]),
                  (f"what size is the {o['color']} {o['shape']}?", o["size"]),
                  (f"where is the {o['color']} {o['shape']}?", o["position"])]
    present = {(o["color"], o["shape"]) for o in objs}
    probe = rng.choice(objs)
    if rng.random() < 0.5:
        fake = (probe["color"], rng.choice(voc["shapes"]))
    else:
        fake = (rng.choice(voc["colors"]), probe["shape"])
    pairs.append((f"is there a {fake[0]} {fake[1]}?", "yes" if fake in present else "no"))
    if len(objs) >= 2:
        a, b = rng.sample(objs, 2)
        r = rng.choice(RELATIONS)
        true = {"to the left of": a["col"] < b["col"], "to the right of": a["col"] > b["col"],
                "above": a["row"] < b["row"], "below": a["row"] > b["row"]}[r]
        pairs.append((f"is the {a['color']} {a['shape']} {r} the {b['color']} {b['shape']}?", "yes" if true else "no"))
    return pairs


def context(scene: dict[str, Any], rng: random.Random) -> str:
    """The scene's attribute words, objects in random order (what soft prompts later stand in for)."""
    order = rng.sample(range(scene["count"]), scene["count"])
    return " , ".join(f"{o['size']} {o['color']} {o['shape']} {o['position']}"
                      for o in (scene["objects"][k] for k in order))


def describe(scene: dict[str, Any], rng: random.Random, cfg: WorldConfig) -> dict[str, Any]:
    """The JSONL record text of a scene: captions, one primary QA pair and all QA pairs."""
    caps = captions(scene, rng, max(1, cfg.captions_per_image))
    qa = qa_pairs(scene, rng, cfg)
    q, a = rng.choice(qa)
    return {"caption": caps[0], "captions": caps, "question": q, "answer": a, "qa": [list(p) for p in qa]}


def all_words(cfg: WorldConfig) -> set[str]:
    """Every word the world's captions and questions use (must be whole tokens in each tokenizer)."""
    voc = vocabulary(cfg)
    words = set(voc["colors"]) | set(voc["shapes"]) | set(voc["sizes"])
    for text in (*POSITIONS, *POSITION_PHRASES.values(), *RELATIONS, *NUMBER_WORDS[1:]):
        words.update(text.split())
    words.update("a an the there is are shapes picture shows of size single with it and what color shape "
                 "object where how many yes no".split())
    from .language import lexicon_words

    return words | lexicon_words(voc)
