"""Only podsweep/natsprivate.py reads another object's private attributes (nats-py's, each named there with why)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ADAPTER = REPO / "podsweep" / "natsprivate.py"


def private_reads(source: str) -> list[str]:
    """`obj._attr` where obj is not self or cls; dunders are public protocol."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            if isinstance(node.value, ast.Name) and node.value.id in {"self", "cls"}:
                continue
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def test_the_check_sees_a_private_read() -> None:
    assert private_reads("kv._js._nc\nself._x\nx.__class__") == ["line 1: kv._js._nc", "line 1: kv._js"]


def test_no_module_but_the_adapter_reads_a_private_attribute() -> None:
    offenders = {
        str(path.relative_to(REPO)): reads
        for package in ("podsweep", "podsweep_cli", "services", "schemas")
        for path in sorted((REPO / package).rglob("*.py"))
        if path != ADAPTER and (reads := private_reads(path.read_text()))
    }
    assert offenders == {}, "move each into podsweep/natsprivate.py with a contract test"
