"""The component plugin API: one `register()` call, or one entry point per component.

Four kinds exist: ``vision``, ``vpg``, ``llm`` and ``converter``. A package makes a component
available either in-process::

    from vpgtrans import Component, register
    register(Component(kind="vpg", name="my-vpg", factory=MyVPG, config_class=MyVPGConfig,
                       description="My visual prompt generator"))

or, without importing anything at start-up, through an entry point in its pyproject::

    [project.entry-points."vpgtrans.vpg"]
    my-vpg = "my_package.module:MY_VPG_COMPONENT"

vpgtrans's own built-ins (package ``vpgtrans_adapters``) are registered by the second route, so
the API is proven by its own use. Nothing is registered as a side effect of importing a module.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.metadata
import threading
from dataclasses import dataclass
from typing import Any, Callable

from .config import from_dict
from .errors import ConfigError, RegistryError

KINDS: tuple[str, ...] = ("vision", "vpg", "llm", "converter")
ENTRY_POINT_GROUPS: dict[str, str] = {kind: f"vpgtrans.{kind}" for kind in KINDS}


@dataclass(frozen=True)
class Component:
    """A named, buildable part of a multimodal model."""

    kind: str
    name: str
    factory: Callable[[Any], Any]
    config_class: type | None = None
    description: str = ""
    aliases: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise RegistryError(f"component '{self.name}' has unknown kind '{self.kind}'",
                                f"use one of: {', '.join(KINDS)}")
        if not self.name or not isinstance(self.name, str):
            raise RegistryError("a component needs a non-empty string name", "pass name='...'")

    def make_config(self, config: dict[str, Any] | None = None) -> Any:
        """Validated config object for this component (the dict itself when no class is declared)."""
        if self.config_class is None:
            return dict(config or {})
        return from_dict(self.config_class, config, where=f"{self.kind} '{self.name}'")

    def build(self, config: dict[str, Any] | Any | None = None) -> Any:
        """Instantiate the component from a config dict or config object."""
        if self.config_class is not None and isinstance(config, self.config_class):
            return self.factory(config)
        return self.factory(self.make_config(config))


@dataclass(frozen=True)
class Registered:
    """A component together with the package that provided it."""

    component: Component
    provider: str

    @property
    def kind(self) -> str:
        return self.component.kind

    @property
    def name(self) -> str:
        return self.component.name


class Registry:
    """Components by kind and name, filled from entry points on first use and by `register`."""

    def __init__(self, discover: bool = True):
        self._items: dict[tuple[str, str], Registered] = {}
        self._aliases: dict[tuple[str, str], str] = {}
        self._discover = discover
        self._discovered = False
        self._lock = threading.RLock()

    def register(self, component: Component, *, provider: str | None = None) -> Component:
        """Make `component` findable by name; the same name twice is an error naming both providers."""
        if not isinstance(component, Component):
            raise RegistryError(f"register() takes a vpgtrans.Component, got {type(component).__name__}",
                                "wrap your class in Component(kind=..., name=..., factory=...)")
        provider = provider or _caller_package()
        with self._lock:
            for name in (component.name, *component.aliases):
                key = (component.kind, name)
                clash = self._items.get(key) or (
                    self._items.get((component.kind, self._aliases[key])) if key in self._aliases else None)
                if clash is not None:
                    raise RegistryError(
                        f"{component.kind} component '{name}' is registered twice: by '{clash.provider}' "
                        f"and by '{provider}'",
                        "uninstall one of the two packages or register under another name")
            self._items[(component.kind, component.name)] = Registered(component, provider)
            for alias in component.aliases:
                self._aliases[(component.kind, alias)] = component.name
        return component

    def _ensure_discovered(self) -> None:
        if not self._discover or self._discovered:
            return
        with self._lock:
            if self._discovered:
                return
            self._discovered = True
            for kind, group in ENTRY_POINT_GROUPS.items():
                for ep in importlib.metadata.entry_points(group=group):
                    provider = ep.dist.name if ep.dist is not None else ep.module
                    try:
                        obj = ep.load()
                    except Exception as exc:  # a broken plugin must not take the whole tool down
                        raise RegistryError(
                            f"entry point '{ep.name}' of package '{provider}' failed to load: {exc}",
                            f"fix or uninstall '{provider}'") from exc
                    component = obj() if callable(obj) and not isinstance(obj, Component) else obj
                    if not isinstance(component, Component) or component.kind != kind:
                        raise RegistryError(
                            f"entry point '{ep.name}' in group '{group}' of '{provider}' is not a "
                            f"vpgtrans.Component of kind '{kind}'", f"fix or uninstall '{provider}'")
                    self.register(component, provider=provider)

    def get(self, kind: str, name: str) -> Registered:
        """Look a component up by kind and name (or alias); unknown names suggest the closest ones."""
        if kind not in KINDS:
            raise RegistryError(f"unknown component kind '{kind}'", f"use one of: {', '.join(KINDS)}")
        self._ensure_discovered()
        key = (kind, self._aliases.get((kind, name), name))
        if key not in self._items:
            names = [n for (k, n) in self._items if k == kind] + [a for (k, a) in self._aliases if k == kind]
            close = difflib.get_close_matches(name, names, n=3, cutoff=0.4)
            hint = f"did you mean {', '.join(repr(c) for c in close)}?" if close else \
                f"available {kind} components: {', '.join(sorted(names)) or 'none'}"
            raise RegistryError(f"no {kind} component named '{name}'",
                                hint + " (`vpgtrans components` lists them all)")
        return self._items[key]

    def build(self, kind: str, name: str, config: dict[str, Any] | Any | None = None) -> Any:
        """Find and instantiate a component."""
        return self.get(kind, name).component.build(config)

    def available(self, kind: str | None = None) -> list[Registered]:
        """All registered components, optionally of one kind, sorted by kind then name."""
        self._ensure_discovered()
        items = [r for r in self._items.values() if kind is None or r.kind == kind]
        return sorted(items, key=lambda r: (KINDS.index(r.kind), r.name))


def _caller_package() -> str:
    import inspect

    for frame in inspect.stack()[2:]:
        module = frame.frame.f_globals.get("__name__", "")
        if module and not module.startswith("vpgtrans.registry"):
            return module.split(".")[0]
    return "__main__"


REGISTRY = Registry()


def register(component: Component, *, provider: str | None = None) -> Component:
    """Register a component in the process-wide registry."""
    return REGISTRY.register(component, provider=provider)


def get(kind: str, name: str) -> Registered:
    """Find a registered component by kind and name."""
    return REGISTRY.get(kind, name)


def build(kind: str, name: str, config: dict[str, Any] | Any | None = None) -> Any:
    """Instantiate a registered component from its config."""
    return REGISTRY.build(kind, name, config)


def available(kind: str | None = None) -> list[Registered]:
    """List registered components."""
    return REGISTRY.available(kind)


def check_components(model: Any) -> None:
    """Validate the config of each component a model spec names now (cheap dataclasses), not after loading."""
    for kind in ("vision", "vpg", "llm"):
        entry = getattr(model, kind)
        if entry.get("name") is not None and not isinstance(entry["name"], str):
            raise ConfigError(f"model.{kind}.name should be a component name, got {entry['name']!r}",
                              "see `vpgtrans components` for the names")
        if entry.get("name"):
            config = {k: v for k, v in entry.items() if k != "name"}
            get(kind, entry["name"]).component.make_config(config)


def describe(reg: Registered) -> dict[str, Any]:
    """JSON-ready description of a registered component."""
    from .config import describe_fields

    comp = reg.component
    info: dict[str, Any] = {"kind": comp.kind, "name": comp.name, "provider": reg.provider,
                            "description": comp.description}
    if comp.aliases:
        info["aliases"] = list(comp.aliases)
    if comp.config_class is not None and dataclasses.is_dataclass(comp.config_class):
        info["config"] = describe_fields(comp.config_class)
    if comp.kind == "vpg":
        info["default_params"], info["default_params_vision_width"] = default_vpg_params(comp)
    return info


def default_vpg_params(comp: Component) -> tuple[int | None, int]:
    """(parameter count, vision width used) of a VPG at its default size, built on the meta device.

    The vision width is the class's ``reference_vision_width`` (the encoder of the paper the VPG
    comes from), else EVA ViT-g's 1408. Nothing is allocated or loaded.
    """
    import torch

    width = int(getattr(comp.factory, "reference_vision_width", 1408))
    try:
        with torch.device("meta"):
            vpg = comp.build({"vision_width": width})
    except Exception:  # noqa: BLE001 - a plugin that cannot be built without files just has no count
        return None, width
    return sum(p.numel() for p in vpg.parameters()), width
