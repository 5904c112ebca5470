"""The shape of the code (issue 30): no production function over 80 lines, ``Any`` only at true boundaries (fewer
than 60 annotations name it), imports at module top unless a comment says why not, and no test module that imports
from another test module (shared helpers live in ``tests/support``). Counted with ``ast`` over the real files: the
layer folders once, never again through their links under ``lesiontrack/``."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("config", "db", "models", "synthetic", "pipeline", "dicom_node", "web", "lesiontrack")
MAX_FUNCTION_LINES = 80
# Annotations naming ``Any``. Issue 30 aims under 60; after its first pass (265 -> 139, 2026-12-07) and its second
# (139 -> 59: typed measurement, confidence evidence and stored-measurement shapes, object where a value is only
# passed on or written out, the registry generic over its engines) what is left is mostly JSON boundaries (JSON
# columns, truth files, checkpoint plans), untyped libraries (torch, Celery, icon_registration), free engine and
# settings options passed on as keywords, metadata bags (``meta``) and the runner's heterogeneous step list.
# A ratchet: the count may only fall — lower it whenever a change removes some.
AIM_ANY = 60
MAX_ANY = 60
# Alembic revisions are frozen records of a schema step, never edited once released: their length is history
FROZEN = (Path("db/migrations/versions"),)


@dataclass(frozen=True)
class Source:
    path: Path  # relative to the repository
    lines: list[str]
    tree: ast.Module


def production_sources() -> list[Source]:
    """Every production module once, at its real path (``lesiontrack/<layer>`` are links to ``../<layer>``)."""
    seen: set[Path] = set()
    sources = []
    for layer in LAYERS:
        for path in sorted((REPO / layer).rglob("*.py")):
            real = path.resolve()
            if real in seen:
                continue
            seen.add(real)
            text = real.read_text(encoding="utf-8")
            sources.append(Source(real.relative_to(REPO), text.splitlines(), ast.parse(text, filename=str(real))))
    return sources


def _functions(tree: ast.AST) -> Iterator[ast.FunctionDef | ast.AsyncFunctionDef]:
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node


def long_functions(sources: list[Source]) -> list[str]:
    """``path:line name (N lines)`` for every function longer than the limit (decorators and docstring included)."""
    found = []
    for src in sources:
        if any(src.path.is_relative_to(frozen) for frozen in FROZEN):
            continue
        for fn in _functions(src.tree):
            first = min([fn.lineno, *(d.lineno for d in fn.decorator_list)])
            n = (fn.end_lineno or fn.lineno) - first + 1
            if n > MAX_FUNCTION_LINES:
                found.append(f"{src.path}:{fn.lineno} {fn.name} ({n} lines)")
    return found


def _annotations(tree: ast.AST) -> Iterator[ast.expr]:
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            args = node.args
            every = [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]
            yield from (a.annotation for a in every if a is not None and a.annotation is not None)
            if node.returns is not None:
                yield node.returns
        elif isinstance(node, ast.AnnAssign):
            yield node.annotation


def _names_any(annotation: ast.expr) -> int:
    """How often ``Any`` (bare, ``typing.Any`` or inside a string annotation) stands in one annotation."""
    n = 0
    for node in ast.walk(annotation):
        if (isinstance(node, ast.Name) and node.id == "Any") or (
            isinstance(node, ast.Attribute) and node.attr == "Any"
        ):
            n += 1
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            try:
                n += _names_any(ast.parse(node.value, mode="eval").body)
            except SyntaxError:
                continue
    return n


def any_annotations(sources: list[Source]) -> dict[str, int]:
    """Per module, how often ``Any`` is named in a type annotation (parameters, returns, annotated assignments)."""
    counts = {str(src.path): sum(_names_any(a) for a in _annotations(src.tree)) for src in sources}
    return {path: n for path, n in counts.items() if n}


def _explained(lines: list[str], lineno: int) -> bool:
    """A comment on the import's own line or on the line above says why it is not at module top."""
    own = lines[lineno - 1]
    above = lines[lineno - 2].strip() if lineno >= 2 else ""
    return "#" in own or above.startswith("#")


def unexplained_local_imports(sources: list[Source]) -> list[str]:
    """``path:line import ...`` for every import inside a function without a comment that says why."""
    found = []
    for src in sources:
        for fn in _functions(src.tree):
            for node in ast.walk(fn):
                if isinstance(node, ast.Import | ast.ImportFrom) and not _explained(src.lines, node.lineno):
                    found.append(f"{src.path}:{node.lineno} {src.lines[node.lineno - 1].strip()}")
    return sorted(set(found))


def test_the_counters_see_what_they_count() -> None:
    code = (
        """
from typing import Any
import typing


def long(a: Any, *rest: "dict[str, Any]") -> typing.Any:
    import json  # lazy: a measured start-up reason
    # optional extra
    import yaml
    import os
    x: list[Any] = []
"""
        + "    x.append(1)\n" * 80
    )
    src = Source(Path("m.py"), code.splitlines(), ast.parse(code))
    assert long_functions([src]) == ["m.py:6 long (86 lines)"]
    assert any_annotations([src]) == {"m.py": 4}
    assert unexplained_local_imports([src]) == ["m.py:10 import os"]


def test_production_is_counted_once_at_its_real_paths() -> None:
    paths = [s.path for s in production_sources()]
    assert len(paths) == len(set(paths))
    assert Path("pipeline/__init__.py") in paths
    assert not [p for p in paths if p.parts[0] == "lesiontrack" and (REPO / "lesiontrack" / p.parts[1]).is_symlink()]


def test_no_production_function_is_over_80_lines() -> None:
    found = long_functions(production_sources())
    assert not found, f"{len(found)} functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(found)


def test_any_only_at_true_boundaries() -> None:
    counts = any_annotations(production_sources())
    total = sum(counts.values())
    worst = sorted(counts.items(), key=lambda kv: -kv[1])
    assert total < MAX_ANY, f"{total} annotations name Any (ratchet {MAX_ANY}, aim under {AIM_ANY}):\n" + "\n".join(
        f"{n:4d} {path}" for path, n in worst
    )


def test_function_level_imports_say_why() -> None:
    found = unexplained_local_imports(production_sources())
    assert not found, (
        f"{len(found)} imports inside functions without a comment saying why (e.g. '# lazy: torch costs 2 s at "
        "start-up', '# optional extra'); move them to the module top or explain:\n" + "\n".join(found)
    )


def test_no_test_module_imports_another_test_module() -> None:
    found = []
    for path in sorted((REPO / "tests").rglob("*.py")):
        if "node_modules" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or "", *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            if any(n.split(".")[-1].startswith("test_") or n == "tests.conftest" for n in names):
                found.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not found, "shared test helpers belong in tests/support, not in test modules:\n" + "\n".join(found)
