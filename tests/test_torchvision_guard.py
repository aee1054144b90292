"""vpgtrans_torchvision_guard: a CUDA torchvision beside a CPU torch is hidden at start (the `eval` extra pulls one)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Loaded from its file: an editable install made before the module existed does not map it yet.
_spec = importlib.util.spec_from_file_location("vpgtrans_torchvision_guard", ROOT / "vpgtrans_torchvision_guard.py")
guard = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(guard)


def _fake(root: Path, package: str, version: str) -> None:
    (root / package).mkdir(parents=True)
    (root / package / "__init__.py").write_text("raise RuntimeError('operator torchvision::nms does not exist')\n")
    (root / package / "version.py").write_text(f"__version__ = '{version}'\ngit_version = 'x'\n")


@pytest.mark.parametrize("torch_version, vision_version, hidden", [
    ("2.13.0+cpu", "0.28.0+cu130", True),   # what `pip install torch==2.13.0 .[eval]` gives on these machines
    ("2.13.0+cpu", "0.28.0+rocm6.4", True),
    ("2.13.0+cpu", "0.28.0+cpu", False),    # a matching CPU build loads: keep it
    ("2.13.0", "0.28.0", False),            # PyPI's default CUDA torch with its torchvision
    ("2.13.0+cu130", "0.28.0+cu130", False),
])
def test_mismatched_builds_only(tmp_path, torch_version, vision_version, hidden):
    _fake(tmp_path, "torch", torch_version)
    _fake(tmp_path, "torchvision", vision_version)
    assert guard.mismatched([str(tmp_path)]) is hidden


def test_no_torchvision_is_no_mismatch(tmp_path):
    _fake(tmp_path, "torch", "2.13.0+cpu")
    assert guard.build_tag("torchvision", [str(tmp_path)]) is None and not guard.mismatched([str(tmp_path)])


def test_a_hidden_torchvision_imports_as_absent(tmp_path):
    """In a fresh interpreter whose torchvision fails to import, the guard turns that into ImportError."""
    _fake(tmp_path, "torch", "2.13.0+cpu")
    _fake(tmp_path, "torchvision", "0.28.0+cu130")
    code = ("import sys; sys.path[:0] = sys.argv[1:]; import vpgtrans_torchvision_guard; import importlib.util\n"
            "print(importlib.util.find_spec('torchvision'))\n"
            "try:\n    import torchvision\nexcept ImportError:\n    print('absent')\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path), str(ROOT)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.split() == ["None", "absent"], out.stderr


def test_the_pth_file_imports_the_guard():
    line = (ROOT / "vpgtrans-torchvision-guard.pth").read_text().strip()
    assert line == "import vpgtrans_torchvision_guard"  # .pth lines starting with `import` run at start
