"""Docs that run: every command and Python block in README.md and docs/ is either run or checked.

Each ```bash / ```python block carries a marker on the line before it:

- ``<!-- docs: run -->``: executed by `test_runnable_blocks_run`, in order, in a fresh folder per page, on the
  tiny world (built once per session, as `vpgtrans world build --size tiny` builds it);
- ``<!-- docs: no-run (why) -->``: needs real weights, a GPU, a server or a long run — checked only.

Every block, run or not, is checked: Python compiles; shell passes `bash -n`; every `vpgtrans …` command it
names (also in `$ …` lines of output blocks and in inline code) exists in click's command tree with the
options it gives, and every `section.key=value` recipe override names a real recipe key. So a renamed option,
a removed command or a renamed recipe key fails here.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").rglob("*.md"))
FILES = [ROOT / "README.md", *DOCS]
SHELL = {"bash", "sh", "shell", "console"}
PYTHON = {"python", "py"}
MARKER = re.compile(r"^<!--\s*docs:\s*(run|no-run)\b\s*(.*?)\s*-->$")
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")
# A launcher's program (`accelerate launch … $(which vpgtrans) train …`) is vpgtrans too.
PROGRAM = "__vpgtrans_program__"


@dataclass
class Block:
    """One fenced code block of a Markdown file."""

    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    body: str
    marker: str | None  # "run", "no-run" or None
    reason: str

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks(path: Path) -> list[Block]:
    """The fenced blocks of one file, each with the marker comment right above it (if any)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found, i = [], 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, fence, lang = match.groups()
        prev = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        marker = MARKER.match(prev)
        body, j = [], i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence):
            body.append(lines[j][len(indent):] if lines[j].startswith(indent) else lines[j])
            j += 1
        found.append(Block(path, i + 1, lang.lower(), "\n".join(body), marker and marker.group(1),
                           marker.group(2) if marker else ""))
        i = j + 1
    return found


ALL = [b for f in FILES for b in blocks(f)]
CODE = [b for b in ALL if b.lang in SHELL | PYTHON]


def _hook():
    """docs/_hooks/reference.py, the module that writes the CLI reference (one walker of click's tree)."""
    spec = importlib.util.spec_from_file_location("docs_reference_hook", ROOT / "docs" / "_hooks" / "reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tree():
    return _hook().command_tree()


@pytest.fixture(scope="module")
def recipe_keys():
    """Every `section.key` a recipe override may name (model.vision/vpg/llm: any built-in component's field)."""
    from vpgtrans.lora import LoraSettings
    from vpgtrans.model import Template
    from vpgtrans.recipes import SECTIONS
    from vpgtrans.registry import available

    keys = {f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
    keys |= {f"model.template.{f.name}" for f in dataclasses.fields(Template)}
    keys |= {f"model.lora.{f.name}" for f in dataclasses.fields(LoraSettings)}
    for kind in ("vision", "vpg", "llm"):
        keys |= {f"model.{kind}.name", f"model.{kind}.path"}
        for reg in available(kind):
            cls = reg.component.config_class
            if cls is not None and dataclasses.is_dataclass(cls):
                keys |= {f"model.{kind}.{f.name}" for f in dataclasses.fields(cls)}
    return keys


# --- reading commands out of shell text ------------------------------------------------------------------
def shell_lines(block: Block) -> list[str]:
    """The commands of a block: continuation lines joined; in console/output blocks only the `$ ` lines."""
    text = block.body.replace("\\\n", " ")
    lines = text.splitlines()
    if block.lang not in SHELL or block.lang == "console" or any(line.startswith("$ ") for line in lines):
        lines = [line[2:] for line in lines if line.startswith("$ ")]
    return lines


def _without_substitutions(line: str) -> str:
    """`$( … )` replaced by a word: what runs inside is another command, not arguments of this one."""
    out, depth = [], 0
    i = 0
    while i < len(line):
        if line.startswith("$(", i):
            if depth == 0:
                out.append("SUBST")
            depth += 1
            i += 2
            continue
        if depth:
            depth += {"(": 1, ")": -1}.get(line[i], 0)
        else:
            out.append(line[i])
        i += 1
    return "".join(out)


def vpgtrans_commands(line: str) -> list[list[str]]:
    """Every `vpgtrans …` invocation in one shell line, as its argument tokens after the program name."""
    line = _without_substitutions(re.sub(r"\$\(\s*which\s+vpgtrans\s*\)", PROGRAM, line))
    # A comment starts at a `#` after a blank (shlex would also cut `page.md#anchor`).
    line = re.sub(r"(^|\s)#.*$", "", line)
    try:
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        lexer.commenters = ""
        tokens = list(lexer)
    except ValueError:  # unbalanced quotes in prose-like text: plain words are enough to find options
        tokens = line.split()
    commands, current = [], []
    for token in [*tokens, ";"]:
        if token and set(token) <= set(";&|"):
            words = [t for t in current if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", t)] if current else []
            if words and words[0] == "vpgtrans":
                commands.append(words[1:])
            elif PROGRAM in words:
                commands.append(words[words.index(PROGRAM) + 1:])
            current = []
        else:
            current.append(token)
    return commands


def check_command(args: list[str], tree: dict, recipe_keys: set[str], where: str) -> list[str]:
    """Problems with one `vpgtrans ARGS` invocation: unknown command, option or recipe key."""
    path, problems = "vpgtrans", []
    # Placeholders of prose (`[key=value …]`, `<dst>`) are not arguments.
    args = [a for a in args if not a.startswith(("[", "<", "…", "..."))]
    i = 0
    while i < len(args):
        arg = args[i]
        node = tree[path]
        if arg.startswith("-"):
            name = arg.split("=", 1)[0]
            if name not in node["options"]:
                problems.append(f"{where}: `{path}` has no option {name}")
        elif node["group"]:
            if arg.isupper():  # `vpgtrans COMMAND --help`: a placeholder for any command
                return problems
            sub = f"{path} {arg}"
            if sub not in tree:
                problems.append(f"{where}: `{path}` has no command '{arg}'")
                return problems
            path = sub
        elif path in ("vpgtrans train", "vpgtrans transfer") and re.match(r"^[a-z_]+(\.[a-z_0-9]+)+=", arg):
            key = arg.split("=", 1)[0]
            if key not in recipe_keys:
                problems.append(f"{where}: recipe key '{key}' does not exist")
        i += 1
    if tree[path]["group"] and path != "vpgtrans":
        problems.append(f"{where}: `{path}` is a group: name one of its commands")
    return problems


# --- the tests -----------------------------------------------------------------------------------------
def test_docs_have_code_blocks_to_check():
    """The extraction itself works: the README and the docs hold runnable and checked blocks."""
    assert any(b.marker == "run" for b in CODE if b.path.name == "README.md")
    assert sum(b.marker == "run" for b in CODE) >= 5
    assert sum(b.marker == "no-run" for b in CODE) >= 10


@pytest.mark.parametrize("block", CODE, ids=lambda b: b.where)
def test_every_command_block_says_whether_it_runs(block):
    """A shell or Python block without a marker would be neither run nor known to need real weights."""
    assert block.marker in ("run", "no-run"), (
        f"{block.where}: put `<!-- docs: run -->` or `<!-- docs: no-run (why) -->` on the line before the block")
    if block.marker == "no-run":
        assert block.reason.strip("() "), f"{block.where}: say why the block does not run: <!-- docs: no-run (why) -->"


@pytest.mark.parametrize("block", [b for b in CODE if b.lang in PYTHON], ids=lambda b: b.where)
def test_python_blocks_compile(block):
    compile(block.body, block.where, "exec")


@pytest.mark.parametrize("block", [b for b in CODE if b.lang in SHELL and b.lang != "console"],
                         ids=lambda b: b.where)
def test_shell_blocks_parse(block):
    result = subprocess.run(["bash", "-n"], input=block.body, capture_output=True, text=True)
    assert result.returncode == 0, f"{block.where}: {result.stderr}"


def test_every_vpgtrans_command_in_the_docs_exists(tree, recipe_keys):
    """Commands and options named in blocks (run or not), `$ ` transcript lines and inline code."""
    problems, checked = [], 0
    for block in ALL:
        if block.lang in PYTHON:
            continue
        for line in shell_lines(block):
            for args in vpgtrans_commands(line):
                checked += 1
                problems += check_command(args, tree, recipe_keys, block.where)
    for path in FILES:
        text = re.sub(r"^(`{3,}|~{3,}).*?^\1", "", path.read_text(encoding="utf-8"), flags=re.S | re.M)
        for span in re.findall(r"(?<!`)`(vpgtrans [^`]+)`(?!`)", text):
            for args in vpgtrans_commands(span):
                checked += 1
                problems += check_command(args, tree, recipe_keys, f"{path.relative_to(ROOT)} `{span}`")
    assert checked >= 50, f"only {checked} commands found: is the extraction broken?"
    assert not problems, "\n".join(problems)


def test_the_checker_catches_a_stale_command(tree, recipe_keys):
    """The check above can fail: a renamed option, a removed command and a misspelt recipe key are reported."""
    stale = ("vpgtrans transfer --src a --dst b --compare-scrach train.max_step=5 && "
             "accelerate launch $(which vpgtrans) trian --recipe x")
    problems = [p for args in vpgtrans_commands(stale) for p in check_command(args, tree, recipe_keys, "x")]
    assert any("--compare-scrach" in p for p in problems)
    assert any("train.max_step'" in p for p in problems)
    assert any("'trian'" in p for p in problems)
    good = "HF_HUB_OFFLINE=1 vpgtrans --debug world build --size tiny | tail -1 # vpgtrans nonsense --x"
    assert [p for args in vpgtrans_commands(good) for p in check_command(args, tree, recipe_keys, "x")] == []


def test_every_recipe_key_and_component_field_has_help():
    """The reference pages print each key's help: a key without one would be a blank row there."""
    from vpgtrans.lora import LoraSettings
    from vpgtrans.model import Template
    from vpgtrans.recipes import SECTIONS
    from vpgtrans.registry import available

    classes = {**{s: c for s, c in SECTIONS.items()}, "model.template": Template, "model.lora": LoraSettings}
    classes |= {f"{r.kind} {r.name}": r.component.config_class for r in available()
                if r.component.config_class is not None and dataclasses.is_dataclass(r.component.config_class)}
    bare = [f"{where}: {f.name}" for where, cls in classes.items() for f in dataclasses.fields(cls)
            if not f.metadata.get("help")]
    assert not bare, f"fields without help (use vpgtrans.config.help_field): {bare}"


def _anchors(page: Path) -> set[str]:
    """The ids MkDocs gives a page's headings: explicit `{#id}`, else the heading's slug."""
    ids = set()
    for line in page.read_text(encoding="utf-8").splitlines():
        match = re.match(r"^#{1,6}\s+(.*?)\s*(?:\{#([\w-]+)\})?\s*$", line)
        if match:
            ids.add(match.group(2) or re.sub(r"[\s]+", "-", re.sub(r"[^\w\s-]", "", match.group(1).lower())).strip("-"))
    return ids


def test_references_to_the_docs_from_code_resolve():
    """Comments and messages cite `docs/page.md#anchor`: the page and the anchor must exist."""
    broken, found = [], 0
    for folder in ("vpgtrans", "vpgtrans_adapters", "benchmarks", "tests", "recipes"):
        for path in (ROOT / folder).rglob("*"):
            if path.suffix not in (".py", ".yaml", ".yml") or path == Path(__file__):
                continue
            for page, anchor in re.findall(r"(docs/[\w/.-]+?\.md)(?:#([\w-]+))?", path.read_text(encoding="utf-8")):
                found += 1
                target = ROOT / page
                if not target.is_file():
                    broken.append(f"{path.relative_to(ROOT)}: {page} does not exist")
                elif anchor and anchor not in _anchors(target):
                    broken.append(f"{path.relative_to(ROOT)}: {page} has no section #{anchor}")
    assert found, "no references found: is the scan broken?"
    assert not broken, "\n".join(broken)


def test_readme_stays_a_short_user_guide():
    """Reference, results and history live on the docs site and in CHANGELOG.md, not in the README."""
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines; move detail to docs/ (at most 300)"


def test_readme_links_resolve():
    """The README is read on the repository page, outside the site: its relative links must name files."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    missing = [t for t in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
               if not re.match(r"^[a-z]+:", t) and not (ROOT / t).exists()]
    assert not missing, f"README.md links to files that do not exist: {missing}"


# --- running the runnable blocks ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_home(tmp_path_factory):
    """A VPGTRANS_HOME holding the tiny world, built exactly as `vpgtrans world build --size tiny` builds it."""
    home = tmp_path_factory.mktemp("docs-home")
    result = subprocess.run(["vpgtrans", "world", "build", "--size", "tiny"], env=_env(home), capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    return home


def _env(home: Path) -> dict[str, str]:
    env = dict(os.environ, VPGTRANS_HOME=str(home), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    # The blocks run against this checkout, whatever an older editable install of it resolves `vpgtrans` to.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


RUN_FILES = sorted({b.path for b in CODE if b.marker == "run"}, key=FILES.index)


@pytest.mark.slow
@pytest.mark.parametrize("path", RUN_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_runnable_blocks_run(path, tiny_home, tmp_path):
    """A page's runnable blocks, in order, in one fresh folder: each must exit 0 as written."""
    for block in [b for b in blocks(path) if b.marker == "run"]:
        assert block.lang in SHELL | PYTHON, f"{block.where}: only shell and Python blocks can run"
        cmd = ["bash", "-euo", "pipefail", "-c", block.body] if block.lang in SHELL else [sys.executable, "-c",
                                                                                         block.body]
        result = subprocess.run(cmd, cwd=tmp_path, env=_env(tiny_home), capture_output=True, text=True,
                                timeout=900)
        assert result.returncode == 0, (f"{block.where} failed (exit {result.returncode}):\n{block.body}\n"
                                        f"--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-4000:]}")
