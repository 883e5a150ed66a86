"""The reference docs cover what the code registers: every JSON-RPC method has an entry in
docs/rpc.md, every error class a row of its module's code table there, every transaction kind a
row of the kinds table, and every CLI command (the argparse tree) a section in docs/cli.md with
an example and each of its options.

The error classes are found by importing every module of ``node`` and ``rpc`` except those that
import torch at import time (found by reading their top-level imports); the classes such a module
declares are read from its source, so they are checked too without importing torch.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import importlib.util
import pkgutil
import re
from pathlib import Path

import pytest

import node
import rpc
from node.cli import build_parser
from node.consensus.txs import BODY_TYPES
from node.economy.api import EconomyKind
from node.errors import NeuroSeedError
from rpc.errors import RpcError
from rpc.methods import default_methods

REPO = Path(__file__).resolve().parent.parent
RPC_DOC = REPO / "docs" / "rpc.md"
CLI_DOC = REPO / "docs" / "cli.md"
README = REPO / "README.md"
# Options every command takes (documented once in docs/cli.md), and argparse's own.
GLOBAL_OPTIONS = frozenset({"--datadir", "--rpc", "--json", "-v", "--verbose", "-h", "--help"})


# --- helpers -------------------------------------------------------------------------------------


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.capitalize() for part in rest)


def _imports_torch(path: Path) -> bool:
    """Whether the module at ``path`` imports torch when it is imported (a top-level import)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    for stmt in tree.body:
        nodes: list[ast.AST] = [stmt]
        if isinstance(stmt, ast.If | ast.Try):
            nodes = list(ast.walk(stmt))
        for n in nodes:
            if isinstance(n, ast.Import) and any(a.name.split(".")[0] == "torch" for a in n.names):
                return True
            if isinstance(n, ast.ImportFrom) and (n.module or "").split(".")[0] == "torch":
                return True
    return False


def _module_path(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.origin is not None, name
    return Path(spec.origin)


def _walk_modules() -> tuple[list[str], list[str]]:
    """Every module of ``node`` and ``rpc``: (imported, skipped because they import torch)."""
    imported: list[str] = []
    skipped: list[str] = []
    for package in (node, rpc):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if info.name.endswith("__main__"):
                continue  # runs the CLI
            if not info.ispkg and _imports_torch(_module_path(info.name)):
                skipped.append(info.name)
                continue
            importlib.import_module(info.name)
            imported.append(info.name)
    return imported, skipped


def _error_classes() -> list[type[NeuroSeedError]]:
    seen: list[type[NeuroSeedError]] = []
    todo: list[type[NeuroSeedError]] = [NeuroSeedError]
    while todo:
        cls = todo.pop()
        if cls in seen:
            continue
        seen.append(cls)
        todo.extend(cls.__subclasses__())
    # The SDK's mirrors of node errors (RpcError subclasses) carry the node error's code.
    return [c for c in seen if not issubclass(c, RpcError)]


@dataclasses.dataclass(frozen=True)
class _Row:
    code: int
    name: str
    parent: str
    reason: str


def _error_tables(text: str) -> dict[str, list[_Row]]:
    """The rows of docs/rpc.md's code tables, by the module path of the heading above them."""
    tables: dict[str, list[_Row]] = {}
    section = text[text.index("## Error codes by module") :]
    current: str | None = None
    for line in section.splitlines():
        heading = re.fullmatch(r"### `([\w/]+\.py)`", line)
        if heading:
            current = heading.group(1)
            tables.setdefault(current, [])
            continue
        row = re.fullmatch(r"\| (\d+) \| `(\w+)`[^|]* \| ([^|]+) \| ([^|]+) \|", line)
        if row and current is not None:
            tables[current].append(
                _Row(int(row.group(1)), row.group(2), row.group(3).strip(), row.group(4).strip())
            )
    return tables


def _declared_in_source(path: Path) -> list[tuple[str, int | None, str]]:
    """(class name, its own ``code`` or None, first base name) of the classes in ``path`` that
    subclass something named like an error (read without importing the module)."""
    out: list[tuple[str, int | None, str]] = []
    for stmt in ast.parse(path.read_text(encoding="utf-8"), str(path)).body:
        if not isinstance(stmt, ast.ClassDef) or not stmt.bases:
            continue
        base = stmt.bases[0]
        base_name = base.attr if isinstance(base, ast.Attribute) else getattr(base, "id", "")
        code = None
        for item in stmt.body:
            if (
                isinstance(item, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == "code" for t in item.targets)
                and isinstance(item.value, ast.Constant)
                and isinstance(item.value.value, int)
            ):
                code = item.value.value
        if code is not None or base_name.endswith(("Error", "Exception")):
            out.append((stmt.name, code, base_name))
    return out


def _sections(text: str) -> dict[str, str]:
    """Markdown sections by heading text (any level), each up to the next heading."""
    out: dict[str, str] = {}
    heading: str | None = None
    lines: list[str] = []
    in_code = False
    for line in text.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        m = None if in_code else re.fullmatch(r"#{1,6} (.+)", line)
        if m:
            if heading is not None:
                out[heading] = "\n".join(lines)
            heading, lines = m.group(1).strip(), []
        else:
            lines.append(line)
    if heading is not None:
        out[heading] = "\n".join(lines)
    return out


def _code_lines(text: str) -> list[str]:
    lines: list[str] = []
    in_code = False
    for line in text.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif in_code:
            lines.append(line)
    return lines


def _commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> list[tuple[tuple[str, ...], argparse.ArgumentParser, bool]]:
    """(command path, its parser, whether it has subcommands) for every command, depth first."""
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                has_subs = any(isinstance(a, argparse._SubParsersAction) for a in sub._actions)
                out.append(((*path, name), sub, has_subs))
                out.extend(_commands(sub, (*path, name)))
    return out


# --- docs/rpc.md ---------------------------------------------------------------------------------


def test_every_rpc_method_has_an_entry() -> None:
    text = RPC_DOC.read_text(encoding="utf-8")
    entries = dict(
        (m.group(1), bool(m.group(2)))
        for m in re.finditer(r"^### (\w+)( \(local only\))?$", text, re.MULTILINE)
    )
    sections = _sections(text)
    table = default_methods()
    assert len(table) > 30
    for method in table:
        assert method.name in entries, f"docs/rpc.md has no '### {method.name}' entry"
        assert entries[method.name] == method.local_only, (
            f"docs/rpc.md: '### {method.name}' must say '(local only)' exactly when it is"
        )
        heading = method.name + (" (local only)" if method.local_only else "")
        body = sections[heading]
        for part in ("Params:", "Result", "Errors"):
            assert part in body, f"docs/rpc.md: {method.name} does not say its {part}"
        assert method.name in "\n".join(_code_lines(body)), f"no example call of {method.name}"
    documented = {name for name in entries if name.startswith(("ns_", "eth_", "net_"))}
    assert documented <= set(table.names()), "docs/rpc.md documents methods that do not exist"


def test_every_error_class_is_in_its_modules_code_table() -> None:
    imported, skipped = _walk_modules()
    assert "node.errors" in imported and "rpc.errors" in imported
    tables = _error_tables(RPC_DOC.read_text(encoding="utf-8"))
    rows_seen: set[tuple[str, str]] = set()
    classes = _error_classes()
    assert len(classes) > 200
    missing: list[str] = []
    for cls in classes:
        path = cls.__module__.replace(".", "/") + ".py"
        rows = {r.name: r for r in tables.get(path, [])}
        parent = cls.__bases__[0].__name__ if cls is not NeuroSeedError else "—"
        inherited = "" if "code" in vars(cls) else " (its parent's code)"
        expected = f"| {cls.code} | `{cls.__name__}`{inherited} | {parent} | {cls.reason} |"
        row = rows.get(cls.__name__)
        if (
            row is None
            or row.code != cls.code
            or row.parent.split(",")[0].split(" ")[0] != parent
            or row.reason != cls.reason
        ):
            missing.append(f"under ### `{path}`: {expected}")
        rows_seen.add((path, cls.__name__))
    # Modules that import torch at import time: their error classes, read from the source.
    for name in skipped:
        path = name.replace(".", "/") + ".py"
        for cls_name, code, _ in _declared_in_source(_module_path(name)):
            if code is None:
                continue
            rows = {r.name: r for r in tables.get(path, [])}
            if cls_name not in rows or rows[cls_name].code != code:
                missing.append(f"under ### `{path}`: a row for {cls_name} ({code})")
            rows_seen.add((path, cls_name))
    assert not missing, "docs/rpc.md needs these rows (or these corrected):\n" + "\n".join(missing)
    # No stale rows: each documented class still exists where the table says.
    stale = {(p, r.name) for p, rs in tables.items() for r in rs} - rows_seen
    assert not stale, f"docs/rpc.md lists error classes that no longer exist: {sorted(stale)}"


def test_torch_free_import_walk_skips_only_torch_modules() -> None:
    """The walk above must not silently drop modules: only those that import torch at import
    time, and those are exactly what the merge/compute packages say needs torch."""
    _, skipped = _walk_modules()
    for name in skipped:
        assert name.startswith(("node.merge.", "node.compute.")), name
        assert _imports_torch(_module_path(name))
    assert "node.merge.recipe" not in skipped and "node.compute.worker" not in skipped


def test_every_transaction_kind_has_a_row_with_its_body_fields() -> None:
    text = RPC_DOC.read_text(encoding="utf-8")
    section = _sections(text)["Transaction kinds"]
    rows = {
        int(m.group(1)): m.group(0)
        for m in re.finditer(r"^\| (\d+) \|.*\|$", section, re.MULTILINE)
    }
    assert set(EconomyKind) <= set(BODY_TYPES)
    for kind, body in BODY_TYPES.items():
        assert kind in rows, f"docs/rpc.md 'Transaction kinds' has no row for kind {kind}"
        row = rows[kind]
        assert f"`{body.__name__}`" in row, f"kind {kind}: body {body.__name__}"
        for f in dataclasses.fields(body):  # type: ignore[arg-type]
            assert f"`{_camel(f.name)}" in row, f"kind {kind}: field {_camel(f.name)}"


# --- docs/cli.md ---------------------------------------------------------------------------------


def test_every_cli_command_has_a_section_with_an_example_and_its_options() -> None:
    text = CLI_DOC.read_text(encoding="utf-8")
    sections = _sections(text)
    commands = _commands(build_parser())
    assert len(commands) > 30
    for path, parser, has_subs in commands:
        command = "neuroseed " + " ".join(path)
        heading = f"`{command}`"
        assert heading in sections, f"docs/cli.md has no '{heading}' heading"
        if has_subs:
            continue
        body = sections[heading]
        assert any(command in line for line in _code_lines(body)), f"no example of {command}"
        for action in parser._actions:
            names = set(action.option_strings) or {action.dest}
            if not action.option_strings or names & GLOBAL_OPTIONS:
                continue
            if action.help == argparse.SUPPRESS:
                continue
            long = max(action.option_strings, key=len)
            assert f"`{long}" in body, f"docs/cli.md: {command} does not explain {long}"


def test_the_global_options_are_explained_once() -> None:
    body = _sections(CLI_DOC.read_text(encoding="utf-8"))["Global options"]
    for option in ("--datadir", "--rpc", "--json", "--verbose"):
        assert f"`{option}" in body


def test_readme_points_to_the_cli_reference() -> None:
    text = README.read_text(encoding="utf-8")
    sections = _sections(text)
    for name in ("Datasets", "Storage", "Models"):
        assert name in sections, f"README.md has no '{name}' section"
        assert "docs/cli.md" in sections[name], f"README.md '{name}' does not link docs/cli.md"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.lower().replace("`", ""))
    return text.replace(" ", "-")


@pytest.mark.parametrize("doc", ["docs/rpc.md", "docs/cli.md", "docs/architecture.md", "README.md"])
def test_relative_links_resolve(doc: str) -> None:
    path = REPO / doc
    for target, anchor in re.findall(
        r"\]\(([^)#:]*)(?:#([^)]*))?\)", path.read_text(encoding="utf-8")
    ):
        linked = path.parent / target if target else path
        assert linked.exists(), f"{doc}: broken link {target}"
        if anchor and linked.suffix == ".md":
            slugs = {_slug(h) for h in _sections(linked.read_text(encoding="utf-8"))}
            assert anchor in slugs, f"{doc}: no heading for #{anchor} in {linked.name}"
