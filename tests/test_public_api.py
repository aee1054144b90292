"""The documented public API: `import vpgtrans` and a third-party plugin package written only with its names."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import vpgtrans

# A plugin as the docs describe it: its own package, one entry point in group vpgtrans.vpg, public names only.
PLUGIN = '''
from dataclasses import dataclass

import torch
from torch import nn

import vpgtrans


@dataclass
class MeanPoolConfig:
    """Averages the vision tokens into `prompts` soft prompts."""

    prompts: int = 2
    vision_width: int = 0


class MeanPool(vpgtrans.VPG):
    def __init__(self, config: MeanPoolConfig):
        super().__init__()
        self.prompts = config.prompts
        self.output_dim = config.vision_width
        self.scale = nn.Parameter(torch.ones(1))

    def num_prompts(self, num_vision_tokens):
        return self.prompts

    def forward(self, features, instructions=None):
        pooled = features.mean(dim=1, keepdim=True) * self.scale
        return pooled.expand(-1, self.prompts, -1)


MEAN_POOL = vpgtrans.Component(kind="vpg", name="mean-pool", factory=MeanPool, config_class=MeanPoolConfig,
                               description="a third-party test VPG: mean of the vision tokens")
'''


def test_the_documented_names_resolve_and_all_lists_them():
    expected = {"Component", "register", "build_model", "load_model", "transfer", "TransferOptions"}
    assert expected <= set(vpgtrans.__all__) and set(vpgtrans.__all__) <= set(dir(vpgtrans))
    for name in vpgtrans.__all__:
        assert getattr(vpgtrans, name) is not None, name
    from vpgtrans.registry import Component, register

    assert vpgtrans.Component is Component and vpgtrans.register is register
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        vpgtrans.nope  # noqa: B018 - the attribute access is the test


def test_transfer_is_callable_before_and_after_its_package_is_imported():
    import vpgtrans.transfer.race  # importing a submodule sets vpgtrans.transfer to the package

    assert callable(vpgtrans.transfer) and vpgtrans.transfer is sys.modules["vpgtrans.transfer"]
    opts = vpgtrans.TransferOptions(src="a", dst="b", overrides=["train.max_steps=3"])
    assert opts.overrides == ("train.max_steps=3",) and opts.recipe_overrides() == ("train.max_steps=3",)
    with pytest.raises(Exception, match="frozen|cannot assign"):
        opts.src = "c"  # type: ignore[misc]


def test_import_and_help_load_no_torch():
    code = ("import sys, vpgtrans\nfrom vpgtrans.cli import main\nvpgtrans.__all__\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('heavy:', sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "heavy: []" in out.stdout, out.stdout + out.stderr


def test_py_typed_ships():
    assert (Path(vpgtrans.__file__).parent / "py.typed").is_file()
    assert '"py.typed"' in (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()


@pytest.mark.slow  # two subprocesses loading torch: ~20 s on a busy 2-core box
def test_a_third_party_plugin_package_is_listed_and_builds_a_model(tmp_path, tiny_paths):
    site = tmp_path / "site"
    (site / "meanpool_plugin").mkdir(parents=True)
    (site / "meanpool_plugin" / "__init__.py").write_text(textwrap.dedent(PLUGIN))
    # What `pip install` of a package declaring the entry point leaves on sys.path: its dist-info.
    info = site / "meanpool_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: meanpool-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[vpgtrans.vpg]\nmean-pool = meanpool_plugin:MEAN_POOL\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
           "VPGTRANS_HOME": str(tmp_path / "home")}

    listed = subprocess.run([sys.executable, "-c", "from vpgtrans.cli import main; main()", "components", "--json",
                             "--no-cache"], env=env, capture_output=True, text=True, timeout=300)
    assert listed.returncode == 0, listed.stderr
    ours = [c for c in json.loads(listed.stdout) if c["name"] == "mean-pool"]
    assert len(ours) == 1 and ours[0]["kind"] == "vpg" and ours[0]["provider"] == "meanpool-plugin"

    spec = {"vision": {"name": "blip2-vit", "path": str(tiny_paths["blip2-vit"])}, "vpg": {"name": "mean-pool"},
            "llm": {"name": "opt", "path": str(tiny_paths["opt"])}}
    code = ("import json, sys, torch, vpgtrans\nfrom vpgtrans.testing import tiny_images\n"
            "model = vpgtrans.build_model(json.loads(sys.argv[1]))\n"
            "text = model.generate(tiny_images(1), config=vpgtrans.GenerationConfig(max_new_tokens=2))\n"
            "print(type(model.vpg).__module__, model.vpg.prompts, len(text))")
    built = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], env=env, capture_output=True, text=True,
                           timeout=300)
    assert built.returncode == 0, built.stderr
    assert built.stdout.split() == ["meanpool_plugin", "2", "1"]
