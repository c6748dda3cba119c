"""The metric names podsweep's code exposes, collected from the source: every `create_counter`/`create_histogram`/
`create_observable_gauge`... call with a literal name, turned into the names /metrics shows by the OpenTelemetry
Prometheus exporter's rules (tests/unit/test_observability.py checks those rules against the real exporter)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("podsweep", "services")
UNIT_SUFFIX = {"s": "seconds", "By": "bytes", "ms": "milliseconds"}
KINDS = frozenset({"counter", "up_down_counter", "histogram", "gauge", "observable_gauge", "observable_counter"})


def instruments() -> dict[str, tuple[str, str]]:
    """name -> (instrument kind, unit) for every instrument created with a literal name in podsweep's code."""
    found: dict[str, tuple[str, str]] = {}
    for top in SOURCES:
        for path in sorted((ROOT / top).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                    continue
                kind = node.func.attr.removeprefix("create_")
                if not node.func.attr.startswith("create_") or kind not in KINDS:
                    continue
                args = {kw.arg: kw.value for kw in node.keywords}
                name = node.args[0] if node.args else args.get("name")
                unit = args.get("unit")
                if isinstance(name, ast.Constant) and isinstance(name.value, str):
                    unit_text = unit.value if isinstance(unit, ast.Constant) and isinstance(unit.value, str) else ""
                    found[name.value] = (kind, unit_text)
    return found


def exposed(name: str, kind: str, unit: str) -> set[str]:
    """The sample names /metrics shows for one instrument (the OpenTelemetry Prometheus exporter's naming)."""
    suffix = UNIT_SUFFIX.get(unit, "")
    base = name if not suffix or name.endswith(f"_{suffix}") else f"{name}_{suffix}"
    if kind in {"counter", "observable_counter"}:
        return {f"{base}_total"}
    if kind == "histogram":
        return {f"{base}_bucket", f"{base}_sum", f"{base}_count"}
    return {base}


def exposed_names() -> set[str]:
    """Every sample name podsweep's /metrics can show (a counter only after its first increment)."""
    names: set[str] = set()
    for name, (kind, unit) in instruments().items():
        names |= exposed(name, kind, unit)
    return names
