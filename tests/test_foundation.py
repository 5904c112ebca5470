"""Project shape: CLI entry points, logging without PHI, Dockerfile basics, layering of imports."""

from __future__ import annotations

import ast
import json
import logging
import re
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from lesiontrack import __version__
from lesiontrack.cli import app

REPO = Path(__file__).resolve().parents[1]


def test_console_script_help_and_version():
    exe = Path(sys.executable).parent / "lesiontrack"
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=True).stdout
    for cmd in ("version", "config", "db"):
        assert cmd in out
    out = subprocess.run([str(exe), "version"], capture_output=True, text=True, check=True).stdout
    assert out.strip() == __version__


def _exec_form(text: str, instruction: str) -> list[str]:
    m = re.search(rf"^{instruction}\s+(\[.*?\])\s*$", text, re.M)
    assert m, f"Dockerfile has no {instruction} in exec form"
    return list(json.loads(m.group(1)))


def test_dockerfile_entrypoint_exists_in_cli():
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"^USER\s+(?!root|0\b)\S+", text, re.M), "image must run as a non-root user"
    assert "HEALTHCHECK" in text
    assert "/health" in text
    assert "VOLUME" in text
    assert "ARG TORCH_VERSION=2.13.0" in text
    assert "ARG TORCH_VARIANT=cpu" in text
    args = _exec_form(text, "ENTRYPOINT") + _exec_form(text, "CMD")
    assert args[0] == "lesiontrack"
    res = CliRunner().invoke(app, [*args[1:], "--help"])
    assert res.exit_code == 0, f"Dockerfile runs 'lesiontrack {' '.join(args[1:])}', which the CLI does not have"


def test_dockerfile_installs_the_wheel_and_its_context_holds_every_package():
    """The runtime stage installs the wheel the first stage builds from the tree; .dockerignore must not drop a
    folder the wheel packages (web/ and synthetic/ were once missing from the image)."""
    import tomllib

    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"^FROM .* AS wheel$", text, re.M)
    assert "pip wheel" in text
    assert "COPY --from=wheel" in text
    ignored = {
        line.strip().rstrip("/")
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "README.md" not in ignored
    assert "pyproject.toml" not in ignored
    for folder in _packaged_folders(project):
        assert (REPO / folder).is_dir(), folder
        assert folder not in ignored, f".dockerignore drops {folder}/, which the wheel packages"


def _packaged_folders(project: dict) -> list[str]:
    """Top-level source folders the wheel packages: lesiontrack and the layer folders linked into it."""
    assert project["tool"]["setuptools"]["packages"]["find"]["include"] == ["lesiontrack", "lesiontrack.*"]
    return ["lesiontrack", *sorted(LAYERS)]


# the layers, each a folder of the repository linked into the package as lesiontrack/<layer>
LAYERS = ("config", "db", "models", "pipeline", "dicom_node", "web", "synthetic")


def test_only_lesiontrack_at_the_top_and_layers_linked_into_it():
    for layer in LAYERS:
        link = REPO / "lesiontrack" / layer
        assert link.is_symlink(), f"lesiontrack/{layer} -> ../{layer}"
        assert link.resolve() == (REPO / layer).resolve(), f"lesiontrack/{layer} -> ../{layer}"


def test_logging_masks_patient_identifiers(capsys):
    from lesiontrack.config.logging import setup_logging

    setup_logging("INFO", json_format=True)
    logging.getLogger("lesiontrack.test").info("received PatientName=DOE^JOHN PatientID=12345 series 1.2.3")
    err = capsys.readouterr().err
    line = json.loads(err.strip().splitlines()[-1])
    assert "DOE" not in line["msg"]
    assert "12345" not in line["msg"]
    assert "1.2.3" in line["msg"]
    setup_logging("WARNING")


# Which top-level packages each package may import (besides itself). Inbound adapters (dicom_node, web) sit on
# pipeline, pipeline on models, db and config beneath all; synthetic (demo/test/bench data generators) sits on
# models and is imported only by the composition root (lesiontrack), tests and benches.
ALLOWED_IMPORTS: dict[str, set[str]] = {
    "config": set(),
    "db": {"config"},
    "models": {"db", "config"},
    "synthetic": {"models", "db", "config"},
    "pipeline": {"models", "db", "config"},
    "dicom_node": {"pipeline", "models", "db", "config"},
    "web": {"pipeline", "models", "db", "config"},
    "lesiontrack": {"dicom_node", "web", "pipeline", "models", "synthetic", "db", "config"},
}


def test_imports_flow_one_way():
    """dicom_node / web → pipeline → models, with db and config beneath them; never upwards or sideways."""
    violations = []
    for pkg, allowed in ALLOWED_IMPORTS.items():
        for path in (REPO / pkg).rglob("*.py"):
            if not path.resolve().is_relative_to((REPO / pkg).resolve()):
                continue  # lesiontrack/<layer> links: checked as <layer>
            tree = ast.parse(path.read_text(), str(path))
            for node in ast.walk(tree):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names = [node.module]
                for name in names:
                    parts = name.split(".")
                    if parts[0] in ALLOWED_IMPORTS and parts[0] != "lesiontrack":
                        violations.append(f"{path.relative_to(REPO)} imports {name}: import lesiontrack.{name}")
                        continue
                    if parts[0] != "lesiontrack":
                        continue
                    top = parts[1] if len(parts) > 1 and parts[1] in ALLOWED_IMPORTS else "lesiontrack"
                    if top != pkg and top not in allowed:
                        violations.append(f"{path.relative_to(REPO)} imports {name}")
    assert not violations, "\n".join(violations)


# -- rooms (issue 30) -------------------------------------------------------------------------------------------------
# Production code: the layers and the composition root, counted in their real folders (not through the links).
PRODUCTION = ("config", "db", "models", "synthetic", "pipeline", "dicom_node", "web", "lesiontrack")
# Layers split into rooms: every module of pipeline/ lives in a room; dicom_node/ keeps a few node-wide modules.
ROOMED = {"pipeline": ("jobs", "science", "dicom", "views"), "dicom_node": ("inbound", "outbound")}
# Which rooms each room may import (besides itself and the layers beneath), all imports counted (also inside
# functions and under TYPE_CHECKING). science is the method and knows no job, object or view; dicom/ encodes and
# decodes with the science's measurements; views read the science, the objects and what jobs recorded; jobs run it all.
ROOM_IMPORTS: dict[str, set[str]] = {
    "pipeline/science": set(),
    "pipeline/dicom": {"pipeline/science"},
    "pipeline/views": {"pipeline/science", "pipeline/dicom", "pipeline/jobs"},
    "pipeline/jobs": {"pipeline/science", "pipeline/dicom", "pipeline/views"},
    "dicom_node/inbound": {"dicom_node"},
    "dicom_node/outbound": {"dicom_node", "dicom_node/inbound"},
}
# module-level exceptions, each with its reason
ROOM_EXCEPTIONS = {
    # the records a prior arrives in (PriorTimepoint) are the pipeline's port, which science chooses among
    ("pipeline.science.prompt_selection", "pipeline.jobs.ports"),
    # the PACS count a transfer is checked against is a C-FIND
    ("dicom_node.inbound.pacs_count", "dicom_node.outbound.scu"),
}
# views never import the runner: only what jobs recorded
VIEWS_MAY_READ_FROM_JOBS = ("pipeline.jobs.store", "pipeline.jobs.contract", "pipeline.jobs.candidates")


def _production_modules() -> dict[str, Path]:
    """Dotted name (without the lesiontrack. prefix for layers) → file, for every production module."""
    out = {}
    for top in PRODUCTION:
        for path in sorted((REPO / top).rglob("*.py")):
            rel = path.relative_to(REPO)
            if top == "lesiontrack" and len(rel.parts) > 1 and rel.parts[1] in LAYERS:
                continue  # the links
            parts = list(rel.with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _imports(path: Path, module: str, *, module_level_only: bool = False) -> set[str]:
    """Absolute dotted names a module imports (lesiontrack. prefix dropped for layers)."""
    tree = ast.parse(path.read_text(), str(path))
    nodes = list(ast.walk(tree)) if not module_level_only else _module_level(tree.body)
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: len(module.split(".")) - node.level + (path.name == "__init__.py")]
                mod = ".".join([*base, *([node.module] if node.module else [])])
            else:
                mod = node.module or ""
            out.add(mod)
            out |= {f"{mod}.{a.name}" for a in node.names}
    cleaned = set()
    for name in out:
        parts = name.split(".")
        if parts[0] == "lesiontrack" and len(parts) > 1 and parts[1] in LAYERS:
            parts = parts[1:]
        cleaned.add(".".join(parts))
    return cleaned


def _module_level(body: list[ast.stmt]) -> list[ast.AST]:
    out: list[ast.AST] = []
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            out.append(node)
        elif isinstance(node, ast.If):
            out += _module_level(node.body) + _module_level(node.orelse)
        elif isinstance(node, ast.Try):
            out += _module_level(node.body) + [n for h in node.handlers for n in _module_level(h.body)]
    return out


def _graph(*, module_level_only: bool = False) -> dict[str, set[str]]:
    mods = _production_modules()
    graph = {}
    for name, path in mods.items():
        targets = set()
        for imported in _imports(path, name, module_level_only=module_level_only):
            while imported and imported not in mods:
                imported = imported.rpartition(".")[0]
            if imported and imported != name and not name.startswith(imported + "."):
                targets.add(imported)  # (a package above the module is imported with it: no edge)
        graph[name] = targets
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, it = work[-1]
            nxt = next(it, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == node:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_no_import_cycle_among_production_modules():
    """No circle, counting every import: at module level, under TYPE_CHECKING and inside functions (an import
    moved into a function to dodge a circle is still a circle)."""
    assert _cycles(_graph(module_level_only=True)) == []
    assert _cycles(_graph()) == [], "import circles (function-level imports included)"


def _room(module: str) -> str:
    parts = module.split(".")
    if parts[0] in ROOMED and len(parts) > 1 and parts[1] in ROOMED[parts[0]]:
        return "/".join(parts[:2])  # a room is a folder: pipeline/jobs
    return parts[0]


def test_rooms_import_one_way():
    violations = []
    graph = _graph()
    for module, targets in sorted(graph.items()):
        room = _room(module)
        if room not in ROOM_IMPORTS:
            continue
        for target in sorted(targets):
            other = _room(target)
            if other == room or other.split("/")[0] != room.split("/")[0] or (module, target) in ROOM_EXCEPTIONS:
                continue  # itself, another layer (test_imports_flow_one_way), or an exception with its reason
            if other not in ROOM_IMPORTS[room]:
                violations.append(f"{module} ({room}) imports {target} ({other})")
            elif room == "pipeline/views" and other == "pipeline/jobs" and target not in VIEWS_MAY_READ_FROM_JOBS:
                violations.append(f"{module}: views read what jobs recorded, never the runner ({target})")
    assert not violations, "\n".join(violations)


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines())


def test_no_room_over_a_fifth_of_production():
    """A room: a layer, or one room of a layer that has them (pipeline/jobs, dicom_node/inbound, ...)."""
    sizes: dict[str, int] = {}
    for module, path in _production_modules().items():
        sizes[_room(module)] = sizes.get(_room(module), 0) + _lines(path)
    total = sum(sizes.values())
    over = {room: f"{n / total:.1%}" for room, n in sizes.items() if n > 0.2 * total}
    assert not over, f"rooms over 20 % of {total} production lines: {over}"
    assert set(ROOMED["pipeline"]) <= {r.split("/")[1] for r in sizes if r.startswith("pipeline/")}


def test_pipeline_root_holds_no_module():
    loose = sorted(p.name for p in (REPO / "pipeline").glob("*.py") if p.name != "__init__.py")
    assert not loose, f"pipeline/ root modules (give each a room, see docs/architecture.md): {loose}"
    folders = sorted(p.name for p in (REPO / "pipeline").iterdir() if (p / "__init__.py").is_file())
    assert folders == sorted(ROOMED["pipeline"]), folders
