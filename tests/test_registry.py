"""The plugin API: in-process register(), entry points of installed distributions, clear errors."""

from __future__ import annotations

import json
import sys
import textwrap
from dataclasses import dataclass

import pytest
from click.testing import CliRunner

from vpgtrans.cli import main
from vpgtrans.errors import ConfigError, RegistryError
from vpgtrans.registry import Component, Registry

BUILT_INS = {("vision", "blip2-vit"), ("vision", "clip-vit"), ("vpg", "qformer"), ("llm", "opt"),
             ("llm", "llama"), ("llm", "causal-lm"), ("llm", "flant5")}


@dataclass
class _Cfg:
    width: int = 3


def _component(name: str = "toy") -> Component:
    return Component(kind="vpg", name=name, factory=lambda cfg: ("built", cfg.width), config_class=_Cfg,
                     description="toy")


def test_register_and_build_in_process():
    reg = Registry(discover=False)
    reg.register(_component(), provider="pkg-a")
    assert reg.build("vpg", "toy", {"width": 5}) == ("built", 5)
    assert [r.name for r in reg.available("vpg")] == ["toy"]


def test_same_name_twice_names_both_providers():
    reg = Registry(discover=False)
    reg.register(_component(), provider="pkg-a")
    with pytest.raises(RegistryError, match="pkg-a.*pkg-b"):
        reg.register(_component(), provider="pkg-b")


def test_unknown_name_suggests_closest():
    reg = Registry(discover=False)
    reg.register(_component("qformer"), provider="x")
    with pytest.raises(RegistryError, match="did you mean 'qformer'"):
        reg.get("vpg", "qfromer")


def test_bad_config_key_and_type_are_one_line_errors():
    comp = _component()
    with pytest.raises(ConfigError, match="unknown key 'widht'.*did you mean 'width'"):
        comp.build({"widht": 2})
    with pytest.raises(ConfigError, match="'width' should be int"):
        comp.build({"width": "wide"})


def test_builtins_come_from_entry_points_with_provider():
    out = CliRunner().invoke(main, ["components", "--json"])
    assert out.exit_code == 0, out.output
    listed = {(c["kind"], c["name"]): c for c in json.loads(out.output)}
    assert BUILT_INS <= set(listed)
    assert all(listed[k]["provider"] == "vpgtrans" and listed[k]["description"] for k in BUILT_INS)


def test_third_party_entry_point_is_discovered_and_usable(tmp_path, monkeypatch):
    """A throwaway installed distribution (dist-info + module on sys.path) adds a VPG by entry point."""
    site = tmp_path / "site"
    (site / "toy_plugin").mkdir(parents=True)
    (site / "toy_plugin" / "__init__.py").write_text(textwrap.dedent("""
        from vpgtrans.registry import Component
        TOY = Component(kind="vpg", name="toy-vpg", factory=lambda cfg: "toy instance", description="a toy VPG")
    """))
    dist = site / "toy_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[vpgtrans.vpg]\ntoy-vpg = toy_plugin:TOY\n")
    monkeypatch.syspath_prepend(str(site))
    reg = Registry()
    found = reg.get("vpg", "toy-vpg")
    assert found.provider == "toy-plugin"
    assert reg.build("vpg", "toy-vpg") == "toy instance"
    assert ("vpg", "qformer") in {(r.kind, r.name) for r in reg.available()}
    sys.modules.pop("toy_plugin", None)


def test_duplicate_entry_point_across_packages_is_an_error(tmp_path, monkeypatch):
    site = tmp_path / "site"
    (site / "clash_plugin").mkdir(parents=True)
    (site / "clash_plugin" / "__init__.py").write_text(
        "from vpgtrans.registry import Component\n"
        "Q = Component(kind='vpg', name='qformer', factory=lambda c: None)\n")
    dist = site / "clash_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: clash-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[vpgtrans.vpg]\nqformer = clash_plugin:Q\n")
    monkeypatch.syspath_prepend(str(site))
    with pytest.raises(RegistryError, match="registered twice.*(vpgtrans.*clash-plugin|clash-plugin.*vpgtrans)"):
        Registry().available()
    sys.modules.pop("clash_plugin", None)
