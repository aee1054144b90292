"""bad_input fuzz (issue 15): annotation readers, the manifest loader and the recipe override parser return a result
or raise a one-line project error — never anything else — for any input. Derandomized (fixed seed), small budget."""

from __future__ import annotations

import json
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

hypothesis = pytest.importorskip("hypothesis", reason="pip install -e '.[dev]' (hypothesis)")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from vpgtrans.errors import VpgtransError  # noqa: E402

FUZZ = settings(max_examples=100, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

KEYS = st.sampled_from(["image", "caption", "question", "answer", "captions", "image_id", "id", "file_name",
                        "annotations", "images", "spec", "vpg", "llm", "vision", "name", "path", "template", "x"])
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                    st.text(max_size=20))
JSON = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                     st.dictionaries(st.one_of(KEYS, st.text(max_size=5)), inner,
                                                                     max_size=5)), max_leaves=20)


def _outcome(call):
    """Run `call`; a project error must be one line with `what — what to do`. Anything else propagates (fails)."""
    try:
        return call()
    except VpgtransError as exc:
        assert "\n" not in str(exc), str(exc)
        return exc


@contextmanager
def _file(content: bytes, name: str) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="vpgtrans-fuzz-") as folder:
        (Path(folder) / name).write_bytes(content)
        yield Path(folder) / name


def _json_bytes(value) -> bytes:
    return json.dumps(value, allow_nan=True).encode()


@FUZZ
@given(st.lists(st.one_of(JSON.map(_json_bytes), st.binary(max_size=40)), max_size=6))
def test_fuzz_bad_input_jsonl_reader(lines):
    from vpgtrans.data.readers import BadSamples, read_jsonl

    with _file(b"\n".join(lines), "a.jsonl") as path:
        for skip in (False, True):
            _outcome(lambda: read_jsonl(path, bad=BadSamples(skip=skip)))


@FUZZ
@given(st.one_of(JSON.map(_json_bytes), st.binary(max_size=60),
                 st.fixed_dictionaries({"images": JSON, "annotations": JSON}).map(_json_bytes)))
def test_fuzz_bad_input_coco_and_cc_sbu_readers(content):
    from vpgtrans.data.readers import BadSamples, read_cc_sbu_align, read_coco

    with _file(content, "filter_cap.json") as path:
        for skip in (False, True):
            _outcome(lambda: read_coco(path, bad=BadSamples(skip=skip)))
            _outcome(lambda: read_cc_sbu_align(path.parent, bad=BadSamples(skip=skip)))


SPEC = st.fixed_dictionaries({
    "vision": st.one_of(JSON, st.fixed_dictionaries({"name": st.sampled_from(["blip2-vit", "nope", ""]),
                                                     "path": SCALARS})),
    "vpg": st.one_of(JSON, st.fixed_dictionaries({"name": st.sampled_from(["qformer", "mlp", 3]),
                                                  "num_query_tokens": SCALARS, "hidden_size": SCALARS})),
    "llm": st.one_of(JSON, st.fixed_dictionaries({"name": st.sampled_from(["opt", "flant5"]), "path": SCALARS,
                                                  "dtype": SCALARS})),
}, optional={"template": JSON, "lora": JSON, "extra": JSON})
MANIFEST = st.fixed_dictionaries({"format": st.just("vpgtrans-model")},
                                 optional={"format_version": SCALARS, "spec": st.one_of(SPEC, JSON),
                                           "projector": JSON, "weights": JSON, "versions": JSON})


@FUZZ
@given(st.one_of(MANIFEST.map(_json_bytes), JSON.map(_json_bytes), st.binary(max_size=60)))
def test_fuzz_bad_input_manifest_loader(content):
    from vpgtrans.checkpoint import manifest_spec, read_manifest

    with _file(content, "manifest.json") as path:
        manifest = _outcome(lambda: read_manifest(path.parent))
    if isinstance(manifest, dict):
        _outcome(lambda: manifest_spec(manifest))


BASE = {"model": {"vision": {"name": "blip2-vit", "path": "v"}, "vpg": {"name": "qformer"},
                  "llm": {"name": "opt", "path": "o"}},
        "data": {"train": "train.jsonl"}, "train": {}}
KEY = st.one_of(st.sampled_from(["lr", "train.lr", "train.betas", "train.epochs", "epochs", "train.seed",
                                 "model.vpg.num_query_tokens", "model.llm", "data", "data.train", "train.until",
                                 "warmup_steps", "train.trainable", "model.vpg.name", "eval.metrics", "a.b.c"]),
                st.text(max_size=12))
VALUE = st.one_of(st.sampled_from(["nan", "inf", "-1", "0", "1e-4", "[2,3]", "[0.9,0.999]", "{a: 1}", "null",
                                   "true", "[", "'", "val_loss<=2", "x>="]), st.text(max_size=12))


@FUZZ
@given(st.lists(st.one_of(st.tuples(KEY, VALUE).map("=".join), st.text(max_size=20)), max_size=3))
def test_fuzz_bad_input_recipe_overrides(overrides):
    from vpgtrans.recipes import build_recipe

    _outcome(lambda: build_recipe(BASE, overrides, name="fuzz"))
