"""MkDocs hook: writes the Reference pages from the code at build time, so they cannot drift from it.

- reference/cli.md: every command and option, walked from click's command tree (`vpgtrans.cli.main`);
- reference/recipe-keys.md: every recipe key with its help, from the config dataclasses' `help_field` metadata;
- reference/components.md: every registered component (kind, name, provider, config fields) and the plugin API.

`tests/test_docs.py` imports `command_tree()` from here to check the commands the docs name.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path
from typing import Any, Iterator

import click

ROOT = Path(__file__).resolve().parents[2]


# --- click's command tree ------------------------------------------------------------------------------
def walk(command: click.Command, path: tuple[str, ...] = ("vpgtrans",)) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    """Every command below `command` (itself included), depth first, subcommands in name order."""
    yield path, command
    if isinstance(command, click.Group):
        for name in sorted(command.commands):
            yield from walk(command.commands[name], path + (name,))


def command_tree() -> dict[str, dict[str, Any]]:
    """`"vpgtrans world build"` → {"options": every option string, "group": bool, "params": [click.Parameter]}."""
    from vpgtrans.cli import main

    tree = {}
    for path, cmd in walk(main):
        options: set[str] = {"--help", "-h"}
        for param in cmd.params:
            if isinstance(param, click.Option):
                options.update(param.opts)
                options.update(param.secondary_opts)
        tree[" ".join(path)] = {"options": options, "group": isinstance(cmd, click.Group), "params": cmd.params,
                                "command": cmd}
    return tree


def _cell(text: Any) -> str:
    """Text that stays inside one Markdown table cell and renders literally."""
    text = " ".join(str(text).split())
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")


def _code(value: Any) -> str:
    """A value shown as inline code in a table cell (backticks in the value cannot close the span)."""
    text = " ".join(str(value).split()).replace("|", "\\|")
    if not text:
        return '`""`'
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def _param_type(param: click.Parameter) -> str:
    if isinstance(param, click.Option) and param.is_flag:
        return "flag"
    if isinstance(param.type, click.Choice):
        return " \\| ".join(_code(c) for c in param.type.choices)
    return _cell(param.type.name.lower())


def _default(param: click.Parameter) -> str:
    if isinstance(param, click.Option) and param.is_flag and param.default is not True:
        return ""
    default = param.default
    # click >= 8.3 marks "no default" with a sentinel object rather than None.
    if default is None or default == () or callable(default) or type(default).__name__ == "Sentinel":
        return ""
    return _code(default)


def cli_page() -> str:
    """reference/cli.md."""
    from vpgtrans.cli import main

    lines = ["# Command line", "",
             "Generated from the `vpgtrans` command tree when the site is built; `vpgtrans COMMAND --help` prints",
             "the same. Options of the `vpgtrans` group itself (`--debug`, `--trust-remote-code`) go before the",
             "command: `vpgtrans --debug train …`.", ""]
    for path, cmd in walk(main):
        name = " ".join(path)
        level = "##" if len(path) <= 2 else "###"
        lines += [f"{level} `{name}`", ""]
        ctx = click.Context(cmd, info_name=name)
        lines += ["```text", cmd.get_usage(ctx).replace("Usage: ", "", 1), "```", ""]
        if cmd.help:
            lines += [inspect.cleandoc(cmd.help).replace("\b\n", ""), ""]
        if isinstance(cmd, click.Group):
            subs = ", ".join(f"[`{s}`](#{_anchor(name + ' ' + s)})" for s in sorted(cmd.commands))
            lines += [f"Commands: {subs}.", ""]
        args = [p for p in cmd.params if isinstance(p, click.Argument)]
        opts = [p for p in cmd.params if isinstance(p, click.Option) and not p.hidden]
        if args:
            lines += ["| argument | type | |", "|---|---|---|"]
            for p in args:
                many = " (one or more)" if p.nargs == -1 else ""
                lines.append(f"| `{p.human_readable_name}` | {_param_type(p)} | {'required' if p.required else 'optional'}{many} |")
            lines.append("")
        if opts:
            lines += ["| option | type | default | what it does |", "|---|---|---|---|"]
            for p in opts:
                names = ", ".join(f"`{o}`" for o in (*p.opts, *p.secondary_opts))
                help_text = _cell(p.help or "")
                if p.multiple and "repeatable" not in help_text:
                    help_text += " (repeatable)"
                if p.required:
                    help_text += " **Required.**"
                lines.append(f"| {names} | {_param_type(p)} | {_default(p)} | {help_text} |")
            lines.append("")
    return "\n".join(lines)


def _anchor(title: str) -> str:
    """The id MkDocs' toc gives a heading like `## \\`vpgtrans world build\\``."""
    return "-".join(title.lower().split())


# --- recipe keys -----------------------------------------------------------------------------------------
def _fields_table(cls: type, prefix: str) -> list[str]:
    from vpgtrans.config import describe_fields

    lines = ["| key | type | default | what it does |", "|---|---|---|---|"]
    for f in describe_fields(cls):
        default = "" if f["default"] is None else _code(json.dumps(f["default"]) if isinstance(
            f["default"], (list, tuple, dict)) else f["default"])
        lines.append(f"| `{prefix}{f['name']}` | {_cell(f['type'])} | {default} | {_cell(f['help']) or '—'} |")
    return lines + [""]


def _recipes() -> list[tuple[str, str]]:
    import yaml

    out = []
    for path in sorted((ROOT / "recipes").glob("*.yaml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        out.append((path.stem, str(data.get("description", ""))))
    return out


def recipe_keys_page() -> str:
    """reference/recipe-keys.md."""
    from vpgtrans.lora import LoraSettings
    from vpgtrans.model import Template
    from vpgtrans.recipes import SECTIONS
    from vpgtrans.world.config import WorldConfig

    lines = ["# Recipe keys", "",
             "Generated from the config dataclasses when the site is built. A recipe is a YAML file with the",
             "sections `model`, `data`, `train` and `eval`; every key below can also be given on the command",
             "line as `section.key=value` (`vpgtrans train --recipe NAME train.lr=5e-4 data.fraction=0.107`).",
             "Values are read as YAML. An unknown key or a value of the wrong type is refused in one line",
             "before anything loads.", "",
             "## Shipped recipes", "", "| recipe | what it is |", "|---|---|"]
    lines += [f"| `{name}` | {_cell(desc) or '—'} |" for name, desc in _recipes()]
    lines += ["", "`--recipe` also takes a path to your own YAML file. Strings may use `${world}` (the synthetic",
              "world's directory) and `${home}` (`$VPGTRANS_HOME`).", ""]
    for section, cls in SECTIONS.items():
        lines += [f"## `{section}`", ""]
        doc = inspect.getdoc(cls)
        if doc:
            lines += [doc.splitlines()[0], ""]
        lines += _fields_table(cls, f"{section}.")
    lines += ["## `model`", "",
              "`model.vision`, `model.vpg` and `model.llm` each name a component (`name:`) and set its config",
              "fields (listed per component in [Components and plugins](components.md)); `path:` says where the",
              "weights are (an alias such as `opt-2.7b`, a world name, a directory or a Hugging Face id).",
              "`model.template` places the soft prompts in the text:", ""]
    lines += _fields_table(Template, "model.template.")
    lines += ["`model.lora` (absent: no LoRA) puts a LoRA adapter on the frozen LLM; it trains with the rest and is",
              "saved in peft's format under `model/lora`:", ""]
    lines += _fields_table(LoraSettings, "model.lora.")
    lines += ["## World knobs {#world-knobs}", "",
              "Not recipe keys: the synthetic world's settings, changed with `vpgtrans world build --set KEY=VALUE`",
              "(`vpgtrans world knobs` prints the same list).", ""]
    lines += _fields_table(WorldConfig, "")
    return "\n".join(lines)


# --- components and the plugin API -----------------------------------------------------------------------
def components_page() -> str:
    """reference/components.md."""
    from vpgtrans import interfaces
    from vpgtrans.registry import ENTRY_POINT_GROUPS, KINDS, Component, available, describe

    lines = ["# Components and plugins", "",
             "Generated from the component registry when the site is built (`vpgtrans components` prints the",
             "same list for what is installed on your machine, `--json` with every field).", ""]
    import vpgtrans.registry as registry_module

    # The module docstring is reStructuredText: its literal blocks open with "::".
    lines += ["## The plugin API", "", (inspect.getdoc(registry_module) or "").replace("::\n", ":\n"), ""]
    lines += ["A component is a `Component`:", "", "| field | type | default |", "|---|---|---|"]
    for f in dataclasses.fields(Component):
        default = "" if f.default is dataclasses.MISSING else _code(f.default)
        lines.append(f"| `{f.name}` | {_cell(f.type)} | {default} |")
    lines += ["", "Entry-point groups: " + ", ".join(f"`{ENTRY_POINT_GROUPS[k]}`" for k in KINDS) + ".", "",
              "What a factory returns, per kind (the interfaces in `vpgtrans/interfaces.py`):", ""]
    for name in ("VisionEncoder", "VPG", "LLMBackend", "Converter"):
        cls = getattr(interfaces, name)
        lines += [f"### `{name}`", "", (inspect.getdoc(cls) or "").strip(), ""]
        methods = [(m, fn) for m, fn in vars(cls).items() if callable(fn) and not m.startswith("_")]
        for m, fn in methods:
            sig = str(inspect.signature(fn)).replace("(self, ", "(").replace("(self)", "()").replace("'", "")
            # fn.__doc__, not inspect.getdoc: an undocumented forward() would show nn.Module's generic text.
            doc = inspect.cleandoc(fn.__doc__ or "").splitlines()
            lines.append(f"- `{m}{sig}`" + (f": {doc[0]}" if doc else ""))
        lines.append("")
    lines += ["## Registered components", ""]
    for kind in KINDS:
        regs = sorted(available(kind), key=lambda r: r.name)
        lines += [f"### {kind}", "", "| name | provider | what it is |", "|---|---|---|"]
        lines += [f"| [`{r.name}`](#{kind}-{r.name}) | `{r.provider}` | {_cell(r.component.description) or '—'} |"
                  for r in regs]
        lines.append("")
        for reg in regs:
            info = describe(reg)
            lines += [f"#### `{reg.name}` ({kind}) {{#{kind}-{reg.name}}}", "", _cell(info["description"]), ""]
            if info.get("aliases"):
                lines += ["Also found as " + ", ".join(f"`{a}`" for a in info["aliases"]) + ".", ""]
            if info.get("default_params") is not None:
                lines += [f"Default size: {info['default_params']:,} parameters (vision width "
                          f"{info['default_params_vision_width']}, projector excluded).", ""]
            if info.get("config"):
                lines += ["| config key | type | default | what it does |", "|---|---|---|---|"]
                for f in info["config"]:
                    default = "" if f["default"] is None else _code(f["default"])
                    lines.append(f"| `{f['name']}` | {_cell(f['type'])} | {default} | {_cell(f['help']) or '—'} |")
                lines.append("")
    return "\n".join(lines)


def python_api_page() -> str:
    """reference/python-api.md: every name `import vpgtrans` exports, with its signature and docstring."""
    import vpgtrans

    lines = ["# Python API", "",
             "Generated from the package when the site is built: every name `import vpgtrans` exports. `import vpgtrans`",
             "itself loads no torch; each name is imported on first use.", ""]
    for name in getattr(vpgtrans, "__all__", []):
        obj = getattr(vpgtrans, name)
        target = getattr(obj, "__call__", None) if name == "transfer" else obj
        sig = ""
        for eval_str in (True, False):  # annotations are strings (PEP 563); some name TYPE_CHECKING-only types
            try:
                sig = str(inspect.signature(obj if inspect.isclass(obj) else target, eval_str=eval_str))
                break
            except (NameError, TypeError, ValueError):
                continue
        kind = "class" if inspect.isclass(obj) else "function"
        doc = inspect.cleandoc(getattr(target, "__doc__", None) or "")
        lines += [f"## `vpgtrans.{name}` {{#{name.lower()}}}", "", "```text", f"{kind} {name}{sig}", "```", "",
                  doc.split("\n\n")[0] if doc else "", ""]
        if dataclasses.is_dataclass(obj) and any(f.metadata.get("help") for f in dataclasses.fields(obj)):
            lines += _fields_table(obj, "")
    return "\n".join(lines)


GENERATORS = {"reference/cli.md": cli_page, "reference/recipe-keys.md": recipe_keys_page,
              "reference/components.md": components_page, "reference/python-api.md": python_api_page}


def on_files(files: Any, config: Any) -> Any:
    """Add the generated Reference pages to the site's files (MkDocs event)."""
    from mkdocs.structure.files import File

    for uri, make in GENERATORS.items():
        files.append(File.generated(config, uri, content=make()))
    return files
