"""bad_input: a model directory can never make vpgtrans run Python shipped with it; only --trust-remote-code can."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from vpgtrans.checkpoint import save_model
from vpgtrans.cli import main
from vpgtrans.model import build_model
from vpgtrans.testing import tiny_images, tiny_spec

pytestmark = pytest.mark.usefixtures("one_thread")

# Importing this file is the attack: it writes the marker. The classes make a trusted load succeed.
EVIL = '''
import pathlib
pathlib.Path({marker!r}).write_text("ran")
from transformers import OPTConfig, OPTForCausalLM
class EvilConfig(OPTConfig):
    model_type = {model_type!r}
class EvilModel(OPTForCausalLM):
    config_class = EvilConfig
'''


def _hostile_model(tiny_paths, root, model_type="opt"):
    """A vpgtrans model dir whose manifest asks for remote code and whose LLM dir ships evil.py."""
    llm = root / "llm"
    shutil.copytree(tiny_paths["opt"], llm)
    marker = root / "marker"
    (llm / "evil.py").write_text(EVIL.format(marker=str(marker), model_type=model_type))
    cfg = json.loads((llm / "config.json").read_text())
    cfg.update(model_type=model_type, auto_map={"AutoConfig": "evil.EvilConfig",
                                                "AutoModelForCausalLM": "evil.EvilModel"})
    (llm / "config.json").write_text(json.dumps(cfg))
    torch.manual_seed(0)
    model_dir = save_model(build_model(tiny_spec(tiny_paths, llm="opt")), root / "model")
    manifest = json.loads((model_dir / "manifest.json").read_text())
    manifest["spec"]["llm"].update(path=str(llm), trust_remote_code=True)
    (model_dir / "manifest.json").write_text(json.dumps(manifest))
    image = root / "a.png"
    tiny_images(1)[0].save(image)
    return model_dir, image, marker


def _generate(model_dir, image, *flags):
    return ["generate", "--model", str(model_dir), "--image", str(image), "--max-new-tokens", "2", *flags]


def test_bad_input_manifest_cannot_turn_on_remote_code(tiny_paths, tmp_path):
    model_dir, image, marker = _hostile_model(tiny_paths, tmp_path)
    result = CliRunner().invoke(main, _generate(model_dir, image))
    # The LLM's model_type is one transformers knows: it loads with the built-in class, evil.py never imported.
    assert result.exit_code == 0, result.output
    assert not marker.exists()
    assert "evil" not in sys.modules and not any("evil" in m for m in sys.modules if "transformers_modules" in m)


def test_bad_input_unknown_code_model_is_refused_in_one_line(tiny_paths, tmp_path):
    model_dir, image, marker = _hostile_model(tiny_paths, tmp_path, model_type="evil-lm")
    result = CliRunner().invoke(main, _generate(model_dir, image))
    assert result.exit_code != 0
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    assert "evil.py" in errors[0] and "--trust-remote-code" in errors[0]
    assert not marker.exists()


def test_llm_config_from_manifest_or_recipe_cannot_turn_on_remote_code(tiny_paths, tmp_path):
    """What `transfer --src DIR` does with the source's LLM entry, and what a recipe's model.llm does."""
    from vpgtrans.errors import ConfigError
    from vpgtrans.model import detect_llm_component
    from vpgtrans.registry import get

    _, _, marker = _hostile_model(tiny_paths, tmp_path / "a")
    get("llm", "opt").component.build({"path": str(tmp_path / "a" / "llm"), "trust_remote_code": True})
    _, _, marker_b = _hostile_model(tiny_paths, tmp_path / "b", model_type="evil-lm")
    with pytest.raises(ConfigError, match="--trust-remote-code"):
        detect_llm_component(str(tmp_path / "b" / "llm"))
    assert not marker.exists() and not marker_b.exists()


@pytest.mark.slow
def test_trust_remote_code_flag_allows_it_and_says_what_runs(tiny_paths, tmp_path):
    model_dir, image, marker = _hostile_model(tiny_paths, tmp_path)
    # A fresh process: transformers copies the code into HF_MODULES_CACHE and registers its classes globally.
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HOME=str(tmp_path / "hf"),
               OMP_NUM_THREADS="1")
    argv = [sys.executable, "-c", "from vpgtrans.cli import main; main()", "--trust-remote-code",
            *_generate(model_dir, image)]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert marker.read_text() == "ran"
    assert str(tmp_path / "llm" / "evil.py") in proc.stderr


def test_every_from_pretrained_call_decides_trust_remote_code_explicitly():
    """Static guard: each `X.from_pretrained(...)` call in the package goes through names.load_pretrained (which
    sets trust_remote_code from the command line) or passes trust_remote_code itself."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    offenders = []
    # vpgtrans/world/ reads back only the checkpoints its own build just wrote: not untrusted input.
    files = [p for p in [*(root / "vpgtrans").rglob("*.py"), *(root / "vpgtrans_adapters").rglob("*.py")]
             if "world" not in p.relative_to(root).parts]
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("from_pretrained", "from_config")
                    and not any(k.arg == "trust_remote_code" for k in node.keywords)):
                receiver = node.func.value.id if isinstance(node.func.value, ast.Name) else ""
                if node.func.attr == "from_config" and receiver[:1].isupper() and not receiver.startswith("Auto"):
                    continue  # a concrete class's from_config runs no shipped code
                offenders.append(f"{path.relative_to(root)}:{node.lineno}")
    assert not offenders, f"from_pretrained without an explicit trust_remote_code: {offenders}"
