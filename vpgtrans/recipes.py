"""YAML recipes: `model:` (components), `data:`, `train:`, `eval:` — every key overridable as `key=value`.

A recipe is found by name in the `recipes/` directory or by path. Strings may use ``${world}``
(the synthetic world's directory) and ``${home}`` (``$VPGTRANS_HOME``).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from . import paths
from .config import core_schema, from_dict, help_field, parse_override, set_dotted
from .data.dataset import DataConfig
from .errors import ConfigError
from .model import ModelSpec
from .registry import check_components
from .train.config import TrainConfig
from .train.objectives import EvalConfig


@dataclass
class TransferDefaults:
    """What `vpgtrans transfer` uses with this recipe when its options leave it open."""

    warmup_lr_scale: float | None = help_field(
        None, help="VPGTrans warm-up LR = this x train.lr when --warmup-lr-scale is not given (unset: the paper's 5). "
                   "A recipe whose epochs are far shorter than the paper's ~810 steps sets it higher, so that one "
                   "warm-up epoch still trains the projector as far")
    warmup_batch_size: int | None = help_field(
        None, help="VPGTrans warm-up batch size when --warmup-batch-size is not given (unset: train.batch_size). A "
                   "warm-up epoch still sees one training epoch's samples. Left unset by the world recipe: a smaller "
                   "warm-up batch than the baseline's gives VPGTrans more optimizer steps per epoch than TFS gets")

    def __post_init__(self) -> None:
        if self.warmup_lr_scale is not None and not self.warmup_lr_scale > 0:
            raise ConfigError(f"transfer.warmup_lr_scale must be positive, got {self.warmup_lr_scale}",
                              "e.g. transfer.warmup_lr_scale=5")


SECTIONS: dict[str, type] = {"data": DataConfig, "train": TrainConfig, "eval": EvalConfig,
                             "transfer": TransferDefaults}
# Keys that may change between a run and its resumption (they don't change what a step computes).
RESUMABLE_KEYS = ("train.max_steps", "train.epochs", "train.until", "train.save_every", "train.eval_every",
                  "train.log_every", "train.keep_checkpoints", "train.num_workers", "data.feature_batch_size",
                  "data.cache_dir", "data.preload_gb", "data.val", "data.max_val_samples", "eval")


@dataclass
class _Top:
    name: str = ""
    description: str = ""
    stage: int = 2
    model: dict = dataclasses.field(default_factory=dict)
    data: dict = dataclasses.field(default_factory=dict)
    train: dict = dataclasses.field(default_factory=dict)
    eval: dict = dataclasses.field(default_factory=dict)
    transfer: dict = dataclasses.field(default_factory=dict)


@dataclass
class Recipe:
    """A validated recipe: typed sections plus the expanded dict it came from."""

    name: str
    description: str
    model: ModelSpec
    data: DataConfig
    train: TrainConfig
    eval: EvalConfig
    source: str | None
    raw: dict[str, Any]
    stage: int = 2  # 1 = BLIP-2 stage 1 (Q-Former alone, no LLM); 2 = VPG + projector on a frozen LLM
    transfer: TransferDefaults = dataclasses.field(default_factory=TransferDefaults)

    def fingerprint(self) -> str:
        """Hash of everything that decides what a training step computes (resume refuses a mismatch)."""
        data = copy.deepcopy(self.raw)
        for key in RESUMABLE_KEYS:
            node = data
            *parents, leaf = key.split(".")
            for p in parents:
                node = node.get(p, {}) if isinstance(node, dict) else {}
            if isinstance(node, dict):
                node.pop(leaf, None)
        data.pop("description", None)
        data.pop("transfer", None)  # defaults for `vpgtrans transfer`, already written into each stage's train.lr
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def recipes_dir() -> Path:
    """The `recipes/` directory shipped next to the package."""
    return Path(__file__).resolve().parent.parent / "recipes"


def list_recipes() -> list[str]:
    """Names of the built-in recipes."""
    return sorted(p.stem for p in recipes_dir().glob("*.yaml"))


def find_recipe(name_or_path: str) -> Path:
    """Path of a recipe given by file path or by built-in name."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    for candidate in (recipes_dir() / f"{name_or_path}.yaml", recipes_dir() / f"{name_or_path}.yml"):
        if candidate.is_file():
            return candidate
    names = list_recipes()
    close = difflib.get_close_matches(name_or_path, names, n=3)
    hint = f"did you mean {', '.join(close)}?" if close else f"available: {', '.join(names) or 'none'}"
    raise ConfigError(f"recipe '{name_or_path}' not found (neither a file nor a name in {recipes_dir()})", hint)


def _strict_loader() -> Any:
    """yaml.SafeLoader that refuses duplicate keys (PyYAML silently keeps the last one)."""
    import yaml

    class Strict(core_schema(yaml.SafeLoader)):  # `mixed_precision: no` is the text "no", as documented
        pass

    def mapping(loader: Any, node: Any, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key '{key}'", key_node.start_mark)
            seen.add(key)
        return loader.construct_mapping(node, deep=deep)

    Strict.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    return Strict


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.load(path.read_bytes().decode("utf-8"), Loader=_strict_loader())  # noqa: S506 - SafeLoader
    except UnicodeDecodeError as exc:
        raise ConfigError(f"recipe {path} is not UTF-8 text (byte {exc.start})", "save it as UTF-8") from None
    except RecursionError:
        raise ConfigError(f"recipe {path} is nested too deeply", "flatten it to model:/data:/train:/eval:") from None
    except OSError as exc:
        raise ConfigError(f"cannot read recipe {path} ({exc.strerror or exc})", "check the path") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"recipe {path}{where}: invalid YAML ({getattr(exc, 'problem', None) or exc})",
                          "fix the YAML syntax (each key once per section)") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} is not a mapping of sections", "start it with model:/data:/train: keys")
    return data


def _override_key(key: str) -> str:
    """`lr` → `train.lr` when exactly one section has that field; dotted keys pass through."""
    if "." in key or key in ("name", "description"):
        return key
    owners = [s for s, cls in SECTIONS.items() if key in {f.name for f in dataclasses.fields(cls)}]
    if len(owners) == 1:
        return f"{owners[0]}.{key}"
    if len(owners) > 1:
        raise ConfigError(f"override '{key}' is ambiguous ({', '.join(owners)})",
                          f"write the section, e.g. {owners[0]}.{key}=...")
    raise ConfigError(f"override '{key}' is not a recipe key",
                      "use section.key=value, e.g. train.lr=1e-4 or model.vpg.num_query_tokens=8")


def _expand(value: Any, variables: dict[str, Any]) -> Any:
    if isinstance(value, str):
        for var, getter in variables.items():
            if "${" + var + "}" in value:
                value = value.replace("${" + var + "}", str(getter()))
        return value
    if isinstance(value, dict):
        return {k: _expand(v, variables) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, variables) for v in value]
    return value


def _variables() -> dict[str, Any]:
    return {"world": paths.world_dir, "home": paths.home}


def build_recipe(data: dict[str, Any], overrides: Sequence[str] = (), *, name: str = "",
                 source: str | None = None) -> Recipe:
    """Apply `key=value` overrides to a recipe dict, expand variables and validate every section."""
    raw = copy.deepcopy(data)
    for text in overrides:
        key, value = parse_override(text)
        set_dotted(raw, _override_key(key), value)
    raw = _expand(raw, _variables())
    top = from_dict(_Top, raw, where="recipe")
    model = from_dict(ModelSpec, top.model, where="recipe model")
    check_components(model)
    sections = {s: from_dict(cls, getattr(top, s), where=f"recipe {s}") for s, cls in SECTIONS.items()}
    if not sections["data"].train:
        raise ConfigError("recipe data: 'train' is not set", "set data.train=PATH (annotations of the training data)")
    if top.stage not in (1, 2):
        raise ConfigError(f"recipe stage {top.stage} is not 1 or 2",
                          "use stage: 1 (BLIP-2 Q-Former pre-training) or stage: 2 (the default)")
    raw.setdefault("name", top.name or name)
    return Recipe(name=top.name or name, description=top.description, model=model, source=source, raw=raw,
                  stage=top.stage, **sections)


def load_recipe(name_or_path: str, overrides: Sequence[str] = ()) -> Recipe:
    """Find, read, override and validate a recipe."""
    path = find_recipe(name_or_path)
    return build_recipe(_read_yaml(path), overrides, name=path.stem, source=str(path))
