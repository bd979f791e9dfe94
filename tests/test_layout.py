"""The project's modules import one way, as the README's structure section draws it: entry
points over the ad-metrics use cases over the queries over the models, with no cycle."""

import ast
from pathlib import Path

from tests.helpers import ROOT

MODULES = {path.stem: path for path in Path(ROOT).glob("*.py")}
ENTRY_POINTS = {"main", "cli", "worker"}
HTTP = {"fastapi", "starlette"}
# The modules around main.py's routes: what a route may ask for, and the HTTP machinery.
AROUND_ROUTES = {"deps", "openapi", "request_checks", "problems", "middleware", "server"}
# What each lower module may not import: nothing above it, and no HTTP below main's machinery.
FORBIDDEN = {
    "deps": {*ENTRY_POINTS, *AROUND_ROUTES} - {"deps"},
    "openapi": {*ENTRY_POINTS, "deps", "request_checks", "server", "auth", "db", "crud"},
    "request_checks": {*ENTRY_POINTS, *AROUND_ROUTES - {"request_checks"}, "auth", "db", "crud"},
    "server": {*ENTRY_POINTS, "deps", "openapi", "request_checks", "auth", "db", "crud"},
    "middleware": {*ENTRY_POINTS, *AROUND_ROUTES - {"middleware", "problems"}, "db", "crud"},
    "problems": {*ENTRY_POINTS, *AROUND_ROUTES - {"problems"}, "auth", "db", "crud", "metrics"},
    "auth": {*ENTRY_POINTS, *AROUND_ROUTES, "metrics", *HTTP},
    "db": {*ENTRY_POINTS, *AROUND_ROUTES, "auth", "metrics", "crud", *HTTP},
    "metrics": {*ENTRY_POINTS, *AROUND_ROUTES, "db", "auth", *HTTP},
    "metrics_sql": {*MODULES} - {"metrics_sql", "models"} | HTTP,
    "crud": {*ENTRY_POINTS, *AROUND_ROUTES, "metrics", "db", "auth", *HTTP},
    "metrics_data": {*ENTRY_POINTS, *AROUND_ROUTES, "metrics", "crud", "db", "auth", "fastapi"},
    "cube": {*MODULES} - {"cube", "models"},
    "models": {*MODULES} - {"models", "name_rule"},
    "name_rule": {*MODULES} - {"name_rule"},
    "errors": {*MODULES} - {"errors"},
    "observability": {*MODULES} - {"observability"},
    "logs": {*MODULES} - {"logs"},
    "backoff": {*MODULES} - {"backoff"},
    "settings": {*MODULES} - {"settings", "models"},
    "turns": {*MODULES} - {"turns", "errors"},
}


def imports(module: str) -> set[str]:
    """The top-level names a module imports."""
    tree = ast.parse(MODULES[module].read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_lower_modules_import_nothing_above_them() -> None:
    for module, forbidden in FORBIDDEN.items():
        assert not imports(module) & forbidden, (module, imports(module) & forbidden)


def test_no_module_imports_an_entry_point() -> None:
    for module in MODULES:
        assert not imports(module) & (ENTRY_POINTS - {module}), module


def test_a_metrics_question_goes_main_metrics_crud() -> None:
    assert {"metrics", "crud"} <= imports("main")
    assert "crud" in imports("metrics")
    assert "metrics_sql" in imports("crud")


def test_main_holds_the_app_and_its_routes_only() -> None:
    """Its machinery lives beside it; what stays is create_app, the lifespan and the routes."""
    assert len(MODULES["main"].read_text().splitlines()) < 600
    tree = ast.parse(MODULES["main"].read_text())
    classes = [node.name for node in tree.body if isinstance(node, ast.ClassDef)]
    assert classes == []


def test_the_project_imports_have_no_cycle() -> None:
    graph = {module: imports(module) & MODULES.keys() for module in MODULES}
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, " -> ".join((*path, module))
        if module not in done:
            for imported in graph[module]:
                visit(imported, (*path, module))
            done.add(module)

    for module in graph:
        visit(module, ())
