"""The configuration reference, `docs/reference/configuration.md`, generated from the typed schema
and the shipped YAML: `python -m trainer.reference` writes it, `--check` fails when it is stale.

It lives in the package, not in docs/, because it reads the schema the way the trainer does
(`RunConfig`, `CONFIG_DIR`, `compose`) and so runs as a module from any directory and is linted with
the rest. Nothing here names a config key: keys, types and defaults come from the dataclasses, the
meaning of a key from the comment beside (or above) its field, the allowed values from the checks
in the schema's module, and "set by" from the YAML files that mention the key. A field added on
another branch shows up on the next run with no change here.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import importlib
import inspect
import sys
import tokenize
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omegaconf import MISSING, OmegaConf

from trainer.config import CONFIG_DIR, RunConfig, compose
from trainer.models.registry import FAMILIES

OUTPUT = CONFIG_DIR.parent / "docs" / "reference" / "configuration.md"
# Hydra's own groups (help text, logging) are not keys of a run.
SKIPPED_DIRS = ("hydra",)
CHECK_FUNCTIONS = {"_one_of": "one of", "_positive": "> 0"}


@dataclasses.dataclass
class Key:
    path: str
    type: str
    default: str
    required: bool
    meaning: str
    allowed: list[str]
    set_by: list[str]


# ---- the schema: fields, their types and the comments beside them ---------------------------

def _comments(source_file: str) -> tuple[dict[int, str], set[int]]:
    """Comment text by line number, and the line numbers that hold nothing but a comment."""
    text = Path(source_file).read_text()
    by_line: dict[int, str] = {}
    code_lines: set[int] = set()
    for tok in tokenize.generate_tokens(iter(text.splitlines(keepends=True)).__next__):
        if tok.type == tokenize.COMMENT:
            by_line[tok.start[0]] = tok.string.lstrip("#").strip()
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                              tokenize.ENDMARKER):
            code_lines.update(range(tok.start[0], tok.end[0] + 1))
    return by_line, set(by_line) - code_lines


def field_comments(cls: type) -> dict[str, str]:
    """Each field's meaning: the comment lines right above it, then the comment on its line."""
    source_file = inspect.getsourcefile(cls)
    assert source_file is not None
    comments, comment_only = _comments(source_file)
    tree = ast.parse(Path(source_file).read_text())
    node = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == cls.__name__)
    result = {}
    for stmt in node.body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        above = []
        line = stmt.lineno - 1
        while line in comment_only:
            above.insert(0, comments[line])
            line -= 1
        parts = [*above]
        if stmt.lineno in comments and stmt.lineno not in comment_only:
            parts.append(comments[stmt.lineno])
        result[stmt.target.id] = " ".join(parts)
    return result


def type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        names = [type_name(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in args else "")
    if origin is dict:
        return f"map {type_name(args[0])} to {type_name(args[1])}" if args else "map"
    if origin in (list, tuple):
        return f"list of {type_name(args[0])}" if args else "list"
    if origin is typing.Literal:
        return "one of " + ", ".join(map(str, args))
    if hint is Any:
        return "any"
    return getattr(hint, "__name__", str(hint))


def _groups() -> dict[str, type]:
    """The RunConfig fields that are a dataclass of their own (`hardware`, `model`, ...)."""
    hints = typing.get_type_hints(RunConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(RunConfig)
            if dataclasses.is_dataclass(hints[f.name])}


def _schema_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return MISSING


# ---- allowed values: the checks in the schema's module and in preflight ---------------------

def _loop_values(parents: list[ast.AST], name: str) -> list[str] | None:
    """The strings a `for name in ("a", "b")` loop around a check binds `name` to."""
    for node in reversed(parents):
        if (isinstance(node, ast.For) and isinstance(node.target, ast.Name)
                and node.target.id == name):
            try:
                values = ast.literal_eval(node.iter)
            except ValueError:
                return None
            return [v for v in values if isinstance(v, str)]
    return None


def _keys_of(expr: ast.expr, parents: list[ast.AST]) -> list[str]:
    """The dotted keys a check's first argument names: a string, `KEY.<dotted>`, or an f-string
    over a loop."""
    if isinstance(expr, ast.Constant) and isinstance(expr.value, str):
        return [expr.value]
    if isinstance(expr, ast.Attribute):  # KEY.trainer.devices
        parts: list[str] = []
        while isinstance(expr, ast.Attribute):
            parts.insert(0, expr.attr)
            expr = expr.value
        return [".".join(parts)] if isinstance(expr, ast.Name) and expr.id == "KEY" else []
    if (isinstance(expr, ast.Call) and isinstance(expr.func, ast.Name)
            and expr.func.id == "getattr" and len(expr.args) == 2
            and isinstance(expr.args[1], ast.Name)):  # getattr(KEY.model, key) over a loop
        heads = _keys_of(expr.args[0], parents)
        values = _loop_values(parents, expr.args[1].id) or []
        return [f"{head}.{v}" for head in heads for v in values]
    if isinstance(expr, ast.JoinedStr) and len(expr.values) == 2:
        head, tail = expr.values
        if (isinstance(head, ast.Constant) and isinstance(tail, ast.FormattedValue)
                and isinstance(tail.value, ast.Name)):
            values = _loop_values(parents, tail.value.id)
            return [f"{head.value}{v}" for v in values or ()]
    return []


def _text(expr: ast.expr, module: Any) -> str | None:
    """A check's message or allowed values as words; an f-string's fields become `…`."""
    if isinstance(expr, ast.Constant) and isinstance(expr.value, str):
        return expr.value
    if isinstance(expr, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "…" for v in expr.values)
    try:
        value = ast.literal_eval(expr)
    except ValueError:
        value = None
        if isinstance(expr, ast.Name):
            value = getattr(module, expr.id, None)
        elif isinstance(expr, ast.Subscript) and isinstance(expr.value, ast.Name):
            table = getattr(module, expr.value.id, None)
            if isinstance(table, dict):
                return "; ".join(f"{', '.join(map(str, v))} (with {k})" for k, v in table.items())
    if isinstance(value, tuple | list):
        return ", ".join(map(str, value))
    return None


def allowed_values(module_name: str) -> dict[str, list[str]]:
    """What each key's checks accept, read from the calls in module `module_name`: `_one_of(key,
    value, allowed)`, `_positive(key, value)` and `ConfigError(key, value, message)`. A call this
    cannot read (a key built at run time) is left out rather than guessed."""
    module = importlib.import_module(module_name)
    tree = ast.parse(Path(inspect.getsourcefile(module) or "").read_text())
    found: dict[str, list[str]] = {}

    def visit(node: ast.AST, parents: list[ast.AST]) -> None:
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.args:
            name = node.func.id
            text = None
            if name == "_one_of" and len(node.args) == 3:
                values = _text(node.args[2], module)
                text = f"one of: {values}" if values else None
            elif name == "_positive":
                text = CHECK_FUNCTIONS[name]
            elif name == "ConfigError" and len(node.args) == 3:
                text = _text(node.args[2], module)
            if text:
                for key in _keys_of(node.args[0], parents):
                    if text not in found.setdefault(key, []):
                        found[key].append(text)
        for child in ast.iter_child_nodes(node):
            visit(child, [*parents, node])

    visit(tree, [])
    return found


# ---- the shipped YAML: options of each group and the keys each file sets ---------------------

@dataclasses.dataclass
class ConfigFile:
    name: str  # "hardware/cpu", "experiment/tiny_cpu_4way", "train.yaml"
    group: str | None
    option: str | None
    about: str
    keys: set[str]


def _leaves(node: Any, prefix: str) -> Iterator[str]:
    """Every dotted key a YAML mapping sets, and the mappings on the way down."""
    for key, value in node.items():
        if key in ("defaults", "hydra"):
            continue
        path = f"{prefix}{key}"
        yield path
        if isinstance(value, dict):
            yield from _leaves(value, f"{path}.")


def _about(path: Path, data: dict) -> str:
    """One line on an option: its `description`, else the first sentence of its header comment."""
    if isinstance(data.get("description"), str) and data["description"]:
        return data["description"]
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if text.startswith("@package"):
            continue
        if not text and header:
            break
        header.append(text)
    words = " ".join(header)
    end = words.find(". ")
    return words if end < 0 else words[:end + 1]


def config_files(config_dir: Path = CONFIG_DIR) -> list[ConfigFile]:
    files = []
    for path in sorted(config_dir.rglob("*.yaml")):
        rel = path.relative_to(config_dir)
        if rel.parts[0] in SKIPPED_DIRS:
            continue
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
        assert isinstance(data, dict), path
        group = "/".join(rel.parts[:-1]) or None
        is_global = group is None or "@package _global_" in path.read_text().split("\n", 1)[0]
        prefix = "" if is_global else f"{group.replace('/', '.')}."
        files.append(ConfigFile(
            name=str(rel.with_suffix("")) if group else rel.name, group=group,
            option=path.stem if group else None, about=_about(path, data),
            keys=set(_leaves(data, prefix))))
    return files


def _set_by(key: str, files: list[ConfigFile]) -> list[str]:
    setters = [f for f in files if key in f.keys]
    by_group: dict[str | None, list[ConfigFile]] = {}
    for f in setters:
        by_group.setdefault(f.group, []).append(f)
    result = []
    for group, found in by_group.items():
        options = [f for f in files if f.group == group]
        if group is not None and len(found) == len(options) and len(options) > 1:
            result.append(f"every `{group}` option")
        else:
            result.extend(f"`{f.name}`" for f in found)
    return result


# ---- the page --------------------------------------------------------------------------------

def _value(value: Any) -> str:
    if value is MISSING or value == "???":
        return "???"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, dict | list):
        return OmegaConf.to_yaml(value).strip() if value else ("{}" if isinstance(value, dict)
                                                              else "[]")
    return str(value)


def _sections(cls: type, prefix: str = "") -> Iterator[tuple[str, type]]:
    """`cls` and every dataclass nested in it, each with the dotted prefix of its keys."""
    yield prefix, cls
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _sections(hints[f.name], f"{prefix}{f.name}.")


def keys() -> list[Key]:
    composed = OmegaConf.to_container(compose([]), resolve=False, throw_on_missing=False)
    assert isinstance(composed, dict)
    files = config_files()
    sections = list(_sections(RunConfig))
    allowed: dict[str, list[str]] = {}
    # the schema's module, and preflight's checks that need facts from outside the config
    # and each model family's shape checks
    families = [family.shape.__module__ for family in FAMILIES.values()]
    for module in dict.fromkeys([*(cls.__module__ for _, cls in sections), "trainer.preflight",
                                 *families]):
        for key, texts in allowed_values(module).items():
            allowed.setdefault(key, []).extend(t for t in texts if t not in allowed.get(key, []))
    result = []
    for prefix, cls in sections:
        hints = typing.get_type_hints(cls)
        meanings = field_comments(cls)
        node: Any = composed
        for part in prefix.split(".")[:-1]:
            node = node.get(part, {}) if isinstance(node, dict) else {}
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                continue
            path = f"{prefix}{f.name}"
            extra = ["true, false"] if hints[f.name] is bool else []
            result.append(Key(
                path=path, type=type_name(hints[f.name]),
                default=_value(node.get(f.name, MISSING) if isinstance(node, dict) else MISSING),
                required=_schema_default(f) is MISSING, meaning=meanings.get(f.name, ""),
                allowed=extra + allowed.get(path, []), set_by=_set_by(path, files)))
    return result


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _code(value: str) -> str:
    # A multi-line default (a map) reads better on one line in a table cell.
    value = value.replace("\n", "; ")
    return f"`{value}`" if "|" not in value else _cell(value)


def render() -> str:
    files = config_files()
    groups = _groups()
    defaults = _default_options()
    all_keys = keys()
    out = [
        # The site's left navigation hidden on this page: its tables need the width.
        "---",
        "hide:",
        "  - navigation",
        "---",
        "",
        "<!-- Generated by `python -m trainer.reference` from trainer/config.py and configs/."
        " Do not edit: run `make reference`. -->",
        "",
        "# Configuration reference",
        "",
        "Every key of a run, from the typed schema (`RunConfig` in `trainer/config.py`) and the "
        "YAML in `configs/`. **Default** is what `python -m trainer` with no overrides uses "
        "(the schema default, or the default option's value); *required* means the schema has "
        "no default, so an option or the command line must set it. **Allowed** lists what the "
        "checks in `trainer/config.py` accept (`…` stands for a value taken from another key). "
        "**Set by** names the files in `configs/` that set the key; any key can also be set on "
        "the command line as `group.key=value`. How to use all this: "
        "[Configuration](../configuration.md).",
        "",
        "## Config groups",
        "",
        "| group | options (the default in bold) |",
        "| --- | --- |",
    ]
    group_names = sorted({f.group for f in files if f.group})
    for group in group_names:
        options = sorted(f.option for f in files if f.group == group and f.option)
        shown = [f"**`{o}`**" if defaults.get(group) == o else f"`{o}`" for o in options]
        out.append(f"| [`{group}`](#{group}) | {', '.join(shown)} |")
    out.append("")
    for group in group_names:
        if group in groups:
            continue
        out += [f"## {group}", "", *_options_table(group, files), ""]
    root = [k for k in all_keys if "." not in k.path]
    if root:
        out += ["## Root keys", "", *_keys_table(root), ""]
    for group, cls in groups.items():
        out += [f"## {group}", ""]
        doc = inspect.getdoc(cls) or ""
        if doc and not doc.startswith(f"{cls.__name__}("):  # dataclass's stand-in docstring
            out += [doc.split("\n\n")[0].replace("\n", " "), ""]
        if any(f.group == group for f in files):
            out += [*_options_table(group, files), ""]
        out += [*_keys_table([k for k in all_keys if k.path.startswith(f"{group}.")]), ""]
    return "\n".join(out).rstrip() + "\n"


def _default_options() -> dict[str, str]:
    root = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "train.yaml"), resolve=False)
    assert isinstance(root, dict)
    found = {}
    for entry in root.get("defaults", []):
        if isinstance(entry, dict):
            for group, option in entry.items():
                if isinstance(option, str) and not str(group).startswith(("override", "optional")):
                    found[str(group)] = option
    return found


def _options_table(group: str, files: list[ConfigFile]) -> list[str]:
    rows = ["| option | what it is |", "| --- | --- |"]
    for f in sorted((f for f in files if f.group == group), key=lambda f: f.option or ""):
        rows.append(f"| `{group}={f.option}` | {_cell(f.about)} |")
    return rows


def _keys_table(found: list[Key]) -> list[str]:
    rows = ["| key | type | default | allowed | meaning | set by |",
            "| --- | --- | --- | --- | --- | --- |"]
    for k in found:
        default = _code(k.default) + (" (*required*)" if k.required else "")
        rows.append(" | ".join([
            f"| `{k.path}`", _cell(k.type), default, _cell("; ".join(k.allowed)),
            _cell(k.meaning), ", ".join(k.set_by) or "command line only"]) + " |")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.reference", description=__doc__
                                     .split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=OUTPUT, help="default: %(default)s")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if the file differs from what would be written")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.output.read_text() if args.output.exists() else ""
        if current == text:
            return 0
        diff = difflib.unified_diff(current.splitlines(), text.splitlines(), "committed",
                                    "generated", lineterm="", n=0)
        print(f"{args.output} is stale: run `make reference` (python -m trainer.reference) and "
              f"commit it", file=sys.stderr)
        print("\n".join(list(diff)[:40]), file=sys.stderr)
        return 1
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
