"""The import rules of docs/architecture.md ("Packages"), read from the source: a new import across a layer fails here.

`schemas/` imports msgspec and the standard library; `podsweep/` imports `schemas/` and third-party packages, never a
service; a service imports `schemas/`, `podsweep/` and itself, never another service; `podsweep_cli/`, the
composition root, may import everything. Only the composition root imports a module by a computed name.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("schemas", "podsweep", "services", "podsweep_cli")
ROOT = "podsweep_cli"
# `python -m podsweep` runs the composition root; nothing imports this file, so it cannot pull a service into the
# runtime.
DOORS = frozenset({"podsweep/__main__.py"})
DYNAMIC_IMPORTS = frozenset({"importlib.import_module", "import_module", "__import__"})


def imported(source: str) -> list[tuple[int, str]]:
    """(line, module) for every import statement and every import by computed name (module `<dynamic>`)."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: stays inside its own package, which the caller names
                found.append((node.lineno, "<relative>"))
            elif node.module is not None:
                found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.Call) and ast.unparse(node.func) in DYNAMIC_IMPORTS:
            found.append((node.lineno, "<dynamic>"))
    return found


def refusal(path: str, module: str) -> str | None:
    """Why the file at `path` (relative to the repository) may not import `module`, or None when it may."""
    layer, *rest = path.split("/")
    top = module.split(".")[0]
    if layer == ROOT or path in DOORS:
        return None
    if module == "<dynamic>":
        return "only the composition root (podsweep_cli) imports a module by a computed name"
    if module == "<relative>":
        return "relative import: write the absolute module so the layer can be checked"
    if top == "__future__":
        return None
    if layer == "schemas":
        if top in {"schemas", "msgspec"} or top in sys.stdlib_module_names:
            return None
        return "schemas/ imports only msgspec and the standard library"
    if top == ROOT:
        return f"{layer}/ is below the composition root and never imports it"
    if layer == "podsweep":
        return "podsweep/ never imports a service" if top == "services" else None
    if layer == "services":
        own = rest[0].removesuffix(".py") if rest else ""
        parts = module.split(".")
        if top == "services" and len(parts) > 1 and parts[1] != own:
            return f"services/{own}/ imports another service ({parts[1]}): move what both need into podsweep/"
        return None
    raise ValueError(f"{path}: not in a checked package ({', '.join(PACKAGES)})")


def violations(repo: Path) -> list[str]:
    found = []
    for package in PACKAGES:
        for file in sorted((repo / package).rglob("*.py")):
            path = file.relative_to(repo).as_posix()
            for line, module in imported(file.read_text()):
                why = refusal(path, module)
                if why:
                    found.append(f"{path}:{line}: {module}: {why}")
    return found


@pytest.mark.parametrize(
    ("path", "module", "allowed"),
    [
        ("schemas/events.py", "msgspec.Struct", True),
        ("schemas/events.py", "datetime.datetime", True),
        ("schemas/events.py", "schemas.refs.DigestRef", True),
        ("schemas/events.py", "yaml", False),
        ("schemas/events.py", "podsweep.bus", False),
        ("schemas/events.py", "services.parser.stored", False),
        ("podsweep/bus.py", "schemas.events.Event", True),
        ("podsweep/bus.py", "nats.js", True),
        ("podsweep/bus.py", "podsweep.aio", True),
        ("podsweep/runtime.py", "services.watcher.main", False),
        ("podsweep/runtime.py", "services", False),
        ("podsweep/runtime.py", "podsweep_cli.services", False),
        ("podsweep/runtime.py", "<dynamic>", False),
        ("podsweep/__main__.py", "podsweep_cli.app.main", True),
        ("services/notifier/cli.py", "services.notifier.check", True),
        ("services/notifier/cli.py", "services.parser.normalize", False),
        ("services/notifier/cli.py", "podsweep.reports.normalize", True),
        ("services/notifier/cli.py", "schemas.report.Report", True),
        ("services/notifier/cli.py", "podsweep_cli.app", False),
        ("services/notifier/cli.py", "<relative>", False),
        ("services/__init__.py", "services.parser", False),
        ("podsweep_cli/app.py", "services.parser.cli.report_app", True),
        ("podsweep_cli/services.py", "<dynamic>", True),
    ],
)
def test_rule(path: str, module: str, allowed: bool) -> None:
    assert (refusal(path, module) is None) is allowed


def test_imports_are_read_in_every_form() -> None:
    source = (
        "import a.b\nfrom c import d, e\nfrom . import f\nimportlib.import_module('g')\n"
        "if TYPE_CHECKING:\n    from h import i\ndef f():\n    import j\n"
    )
    assert sorted(imported(source)) == [
        (1, "a.b"),
        (2, "c.d"),
        (2, "c.e"),
        (3, "<relative>"),
        (4, "<dynamic>"),
        (6, "h.i"),
        (8, "j"),
    ]


def test_no_import_crosses_a_layer() -> None:
    assert violations(REPO) == []
