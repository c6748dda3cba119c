"""Mutation testing of the pure decision modules: small deliberate bugs, each run against that module's unit tests.

A mutant changes one thing in one module (an operator, a comparison's boundary, a boolean, a number, an `if` whose
block never runs, a `return` that returns None, a call statement dropped) in a copy of the tree; it is killed when the
unit tests of its area that import the module fail, or hang (use ten times the CPU time of the unchanged run, at
least 30 s: CPU, not wall time, so a loaded machine ends no run early). Not part of the test command: slow.
Mutants named in bench/mutation_equivalent.txt change no behaviour and are left out of the score.

    .venv/bin/python bench/mutation.py [--module services/dispatcher/plan.py ...] [--sample 0.5 --seed 1]

Prints the survivors, then one JSON object last: {"modules", "mutants", "killed", "survived", "score", ...}.
"""

from __future__ import annotations

import argparse
import ast
import compileall
import json
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EQUIVALENT_FILE = ROOT / "bench" / "mutation_equivalent.txt"
PROJECT_PACKAGES = ("podsweep", "schemas", "services", "tests", "conftest")

# module -> the unit-test files of its area (tests/unit/test_<area>*.py) that import it
MODULES: dict[str, str] = {
    "services/dispatcher/plan.py": "dispatcher",
    "services/dispatcher/limits.py": "dispatcher",
    "services/dispatcher/parking.py": "dispatcher",
    "services/dispatcher/sightings.py": "dispatcher",
    "services/dispatcher/batching.py": "dispatcher",
    "services/notifier/decide.py": "notifier",
    "services/notifier/outbox.py": "notifier",
    "services/notifier/retry.py": "notifier",
    "podsweep/policy.py": "policy",
    "services/admission/decide.py": "admission",
    "services/watcher/podstate.py": "watcher",
    "services/watcher/jobstatus.py": "watcher",
}

_COMPARE_SWAP: dict[type[ast.cmpop], type[ast.cmpop]] = {
    ast.Lt: ast.LtE,
    ast.LtE: ast.Lt,
    ast.Gt: ast.GtE,
    ast.GtE: ast.Gt,
    ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq,
    ast.In: ast.NotIn,
    ast.NotIn: ast.In,
    ast.Is: ast.IsNot,
    ast.IsNot: ast.Is,
}
_BINOP_SWAP: dict[type[ast.operator], type[ast.operator]] = {
    ast.Add: ast.Sub,
    ast.Sub: ast.Add,
    ast.Mult: ast.Div,
    ast.Div: ast.Mult,
    ast.FloorDiv: ast.Div,
    ast.Mod: ast.FloorDiv,
    ast.BitOr: ast.BitAnd,
    ast.BitAnd: ast.BitOr,
    ast.Pow: ast.Mult,
}
_SYMBOL = {
    ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==", ast.NotEq: "!=", ast.In: "in",
    ast.NotIn: "not in", ast.Is: "is", ast.IsNot: "is not", ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/",
    ast.FloorDiv: "//", ast.Mod: "%", ast.BitOr: "|", ast.BitAnd: "&", ast.Pow: "**", ast.And: "and", ast.Or: "or",
}  # fmt: skip


@dataclass(frozen=True)
class Mutant:
    module: str
    index: int  # the position of the changed node in ast.walk order of the module
    variant: int  # which change of that node (a Compare with two operators has two)
    line: int
    column: int
    what: str

    @property
    def key(self) -> str:
        return f"{self.module}:{self.line}:{self.column}: {self.what}"


def _annotations(tree: ast.AST) -> set[int]:
    """ids of every node inside an annotation (not evaluated here, or evaluated once by msgspec at import)."""
    out: set[int] = set()
    for node in ast.walk(tree):
        roots: list[ast.AST | None] = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            roots.append(node.returns)
        elif isinstance(node, (ast.arg, ast.AnnAssign)):
            roots.append(node.annotation)
        for root in roots:
            if root is not None:
                out.update(id(n) for n in ast.walk(root))
    return out


def _in_functions(tree: ast.Module) -> set[int]:
    """ids of nodes inside function bodies, and of module- or class-level numeric constants."""
    out: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for stmt in node.body:
                out.update(id(n) for n in ast.walk(stmt))
        elif isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
            for n in ast.walk(node.value):
                if isinstance(n, ast.Constant) and type(n.value) in (int, float):
                    out.add(id(n))
    return out


def _docstrings(tree: ast.Module) -> set[int]:
    out: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first))
    return out


def _changes(node: ast.AST) -> list[str]:
    """What can be changed in this node, one description per variant."""
    if isinstance(node, ast.Compare):
        return [
            f"{_SYMBOL[type(op)]} -> {_SYMBOL[_COMPARE_SWAP[type(op)]]}" for op in node.ops if type(op) in _COMPARE_SWAP
        ]
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOP_SWAP:
        return [f"{_SYMBOL[type(node.op)]} -> {_SYMBOL[_BINOP_SWAP[type(node.op)]]}"]
    if isinstance(node, ast.AugAssign) and type(node.op) in _BINOP_SWAP:
        return [f"{_SYMBOL[type(node.op)]}= -> {_SYMBOL[_BINOP_SWAP[type(node.op)]]}="]
    if isinstance(node, ast.BoolOp):
        return ["and -> or" if isinstance(node.op, ast.And) else "or -> and"]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        return ["not x -> x"]
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool):
            return [f"{node.value} -> {not node.value}"]
        if type(node.value) in (int, float):
            return [f"{node.value!r} -> {node.value + 1!r}"]
        return []
    if isinstance(node, ast.If):
        return ["if <condition> -> if False (block never runs)"]
    if (
        isinstance(node, ast.Return)
        and node.value is not None
        and not (isinstance(node.value, ast.Constant) and node.value.value is None)
    ):
        return ["return x -> return None"]
    if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
        return ["call statement removed"]
    return []


def _apply(node: ast.AST, variant: int, parents: dict[int, tuple[ast.AST, str, int | None]]) -> None:
    if isinstance(node, ast.Compare):
        positions = [i for i, op in enumerate(node.ops) if type(op) in _COMPARE_SWAP]
        i = positions[variant]
        node.ops[i] = _COMPARE_SWAP[type(node.ops[i])]()
    elif isinstance(node, (ast.BinOp, ast.AugAssign)):
        node.op = _BINOP_SWAP[type(node.op)]()
    elif isinstance(node, ast.BoolOp):
        node.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
    elif isinstance(node, ast.UnaryOp):
        _replace(node, node.operand, parents)
    elif isinstance(node, ast.Constant):
        node.value = (not node.value) if isinstance(node.value, bool) else node.value + 1
    elif isinstance(node, ast.If):
        node.test = ast.Constant(False)
    elif isinstance(node, ast.Return):
        node.value = ast.Constant(None)
    elif isinstance(node, ast.Expr):
        _replace(node, ast.Pass(), parents)


def _replace(node: ast.AST, new: ast.AST, parents: dict[int, tuple[ast.AST, str, int | None]]) -> None:
    parent, field, position = parents[id(node)]
    if position is None:
        setattr(parent, field, new)
    else:
        getattr(parent, field)[position] = new


def _parents(tree: ast.AST) -> dict[int, tuple[ast.AST, str, int | None]]:
    out: dict[int, tuple[ast.AST, str, int | None]] = {}
    for parent in ast.walk(tree):
        for field, value in ast.iter_fields(parent):
            if isinstance(value, ast.AST):
                out[id(value)] = (parent, field, None)
            elif isinstance(value, list):
                for i, item in enumerate(value):
                    if isinstance(item, ast.AST):
                        out[id(item)] = (parent, field, i)
    return out


def mutants_of(module: str, source: str) -> list[Mutant]:
    tree = ast.parse(source)
    inside = _in_functions(tree)
    skip = _annotations(tree) | _docstrings(tree)
    out = []
    for index, node in enumerate(ast.walk(tree)):
        if id(node) not in inside or id(node) in skip:
            continue
        for variant, what in enumerate(_changes(node)):
            out.append(Mutant(module, index, variant, getattr(node, "lineno", 0), getattr(node, "col_offset", 0), what))
    return out


def mutated_source(source: str, mutant: Mutant) -> str:
    tree = ast.parse(source)
    parents = _parents(tree)
    node = next(n for i, n in enumerate(ast.walk(tree)) if i == mutant.index)
    _apply(node, mutant.variant, parents)
    return ast.unparse(ast.fix_missing_locations(tree))


def tests_for(module: str, area: str, root: Path) -> list[str]:
    dotted = module.removesuffix(".py").replace("/", ".")
    package, leaf = dotted.rsplit(".", 1)
    pattern = re.compile(
        rf"(import {re.escape(dotted)}\b|from {re.escape(dotted)} import|from {re.escape(package)} import [^\n]*\b{leaf}\b)"
    )
    return sorted(
        str(path.relative_to(root))
        for path in (root / "tests" / "unit").glob(f"test_{area}*.py")
        if pattern.search(path.read_text())
    )


# --- running ------------------------------------------------------------------------------------------------------


def _start_child(copy_root: Path, module: str, source: str, tests: list[str]) -> int:
    """Fork a child that writes `source` as `module` in its copy of the tree and runs the tests there."""
    pid = os.fork()
    if pid == 0:  # the child: never returns
        try:
            os.chdir(copy_root)
            sys.path.insert(0, str(copy_root))
            (copy_root / module).write_text(source)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            import pytest

            rc = pytest.main(["-x", "-q", "-p", "no:cacheprovider", *tests])
            loaded = sys.modules.get(module.removesuffix(".py").replace("/", "."))
            if loaded is not None and not str(getattr(loaded, "__file__", "")).startswith(str(copy_root)):
                os._exit(99)  # the tests imported the module from somewhere else: the run would prove nothing
            os._exit(int(rc))
        except BaseException:
            os._exit(98)
    return pid


def _cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a running child has used so far, from /proc (Linux)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def _run_all(
    copies: list[Path], module: str, sources: list[str], tests: list[str], cpu_limit_s: float
) -> list[tuple[str, float]]:
    """('killed' | 'survived' | 'timeout', CPU seconds) for each source, in up to len(copies) children at once.

    A child is stopped as hung when its own CPU time passes `cpu_limit_s`: wall time would also count the time the
    child waits for a core on a loaded machine, and end the slowest runs (those that pass every test) as "hung"."""
    outcomes: list[tuple[str, float]] = [("", 0.0)] * len(sources)
    pending = list(enumerate(sources))
    running: dict[int, tuple[int, Path]] = {}  # pid -> (index, copy)
    free = list(copies)
    while pending or running:
        while pending and free:
            index, source = pending.pop(0)
            copy_root = free.pop()
            pid = _start_child(copy_root, module, source, tests)
            running[pid] = (index, copy_root)
        for pid, (index, copy_root) in list(running.items()):
            done, status, usage = os.wait4(pid, os.WNOHANG)
            if not done and _cpu_seconds(pid) > cpu_limit_s:
                os.kill(pid, signal.SIGKILL)
                _, _, usage = os.wait4(pid, 0)
                outcomes[index] = ("timeout", usage.ru_utime + usage.ru_stime)
            elif done:
                code = os.waitstatus_to_exitcode(status)
                if code == 99:
                    sys.exit(f"mutation: {module} was not imported from {copy_root}; check the editable install")
                outcomes[index] = ("survived" if code == 0 else "killed", usage.ru_utime + usage.ru_stime)
            else:
                continue
            del running[pid]
            free.append(copy_root)
        time.sleep(0.02)
    return outcomes


def _preload(copy_root: Path, tests: list[str]) -> None:
    """Import in this process what the tests import from outside the project, so that each forked child starts warm."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        os.chdir(copy_root)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        import pytest

        pytest.main(["-q", "-p", "no:cacheprovider", "--collect-only", *tests])
        names = [n for n in list(sys.modules) if n.split(".")[0] not in PROJECT_PACKAGES and not n.startswith("test_")]
        os.write(write, "\n".join(names).encode())
        os._exit(0)
    os.close(write)
    chunks = []
    while chunk := os.read(read, 1 << 16):
        chunks.append(chunk)
    os.waitpid(pid, 0)
    for name in b"".join(chunks).decode().splitlines():
        try:
            __import__(name)
        except Exception:  # a module that imports only in its own context is simply not preloaded
            continue


def _copy_tree(source: Path, into: Path) -> Path:
    into.mkdir()
    for name in ("podsweep", "schemas", "services", "tests"):
        shutil.copytree(source / name, into / name, ignore=shutil.ignore_patterns("__pycache__", "kubebins"))
    shutil.copy(source / "pyproject.toml", into / "pyproject.toml")
    return into


def _equivalents() -> set[str]:
    if not EQUIVALENT_FILE.exists():
        return set()
    keys = set()
    for line in EQUIVALENT_FILE.read_text().splitlines():
        key = line.split("  #", 1)[0].strip()
        if key and not key.startswith("#"):
            keys.add(key)
    return keys


def _sample(mutants: list[Mutant], fraction: float, seed: int) -> list[Mutant]:
    if fraction >= 1:
        return mutants
    chosen = random.Random(seed).sample(mutants, max(1, round(len(mutants) * fraction)))
    return sorted(chosen, key=lambda m: (m.index, m.variant))


def run(modules: list[str], fraction: float, seed: int, jobs: int, root: Path = ROOT) -> dict[str, object]:
    # Bytecode of the unchanged tree is compiled once; children never write any, so a mutant's module (written
    # later, with another mtime) is always compiled from its source and never cached for the next mutant.
    sys.dont_write_bytecode = True
    os.environ.setdefault("HYPOTHESIS_PROFILE", "default")
    equivalent = _equivalents()
    totals = {"mutants": 0, "killed": 0, "survived": 0, "timeouts": 0, "equivalent": 0}
    per_module: dict[str, dict[str, object]] = {}
    survivors: list[str] = []
    timed_out: list[str] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="podsweep-mutation-") as scratch:
        copies = [_copy_tree(root, Path(scratch) / f"tree-{i}") for i in range(jobs)]
        for copy_root in copies:
            compileall.compile_dir(copy_root, quiet=1)
        copy_root = copies[0]
        all_tests = sorted({t for m in modules for t in tests_for(m, MODULES[m], copy_root)})
        _preload(copy_root, all_tests)
        for module in modules:
            tests = tests_for(module, MODULES[module], copy_root)
            original = (root / module).read_text()
            if not tests:
                sys.exit(f"mutation: no unit test of area {MODULES[module]!r} imports {module}")
            # The unchanged module, written the way mutants are (unparsed), must pass: it is the baseline.
            ((baseline, took),) = _run_all(copies[:1], module, [ast.unparse(ast.parse(original))], tests, 600)
            if baseline != "survived":
                sys.exit(f"mutation: the unit tests {tests} fail on the unchanged {module}; fix them first")
            cpu_limit_s = max(10 * took, 30)  # CPU seconds: a mutant that loops is stopped, a slow machine is not
            found = mutants_of(module, original)
            keys = {m.key for m in found}
            for stale in sorted(k for k in equivalent if k.startswith(f"{module}:") and k not in keys):
                print(f"# {EQUIVALENT_FILE.name}: {stale!r} matches no mutant (the line moved?)", file=sys.stderr)
            chosen = _sample(found, fraction, seed)
            counts = {"found": len(found), "mutants": 0, "killed": 0, "survived": 0, "timeouts": 0, "equivalent": 0}
            to_run = [m for m in chosen if m.key not in equivalent]
            counts["equivalent"] = len(chosen) - len(to_run)
            outcomes = _run_all(copies, module, [mutated_source(original, m) for m in to_run], tests, cpu_limit_s)
            for mutant, (outcome, _) in zip(to_run, outcomes, strict=True):
                counts["mutants"] += 1
                if outcome == "survived":
                    counts["survived"] += 1
                    survivors.append(mutant.key)
                    print(f"SURVIVED {mutant.key}    | {original.splitlines()[mutant.line - 1].strip()}", flush=True)
                else:
                    counts["killed"] += 1
                    counts["timeouts"] += outcome == "timeout"
                    if outcome == "timeout":
                        timed_out.append(mutant.key)
                        print(f"TIMEOUT {mutant.key} (counted as killed)", flush=True)
            for copy_root in copies:
                (copy_root / module).write_text(original)
            for name in totals:
                totals[name] += counts[name]
            per_module[module] = {
                **counts,
                "tests": [Path(t).name for t in tests],
                "score": round(counts["killed"] / counts["mutants"], 3) if counts["mutants"] else None,
            }
            print(f"# {module}: {json.dumps(per_module[module])}", file=sys.stderr, flush=True)
    return {
        "modules": modules,
        "mutants": totals["mutants"],
        "killed": totals["killed"],
        "survived": totals["survived"],
        "score": round(totals["killed"] / totals["mutants"], 3) if totals["mutants"] else None,
        "timeouts": totals["timeouts"],
        "equivalent_skipped": totals["equivalent"],
        "sample": fraction,
        "seed": seed,
        "seconds": round(time.monotonic() - started),
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%MZ"),
        "per_module": per_module,
        "survivors": survivors,
        "timed_out": timed_out,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--module", action="append", choices=sorted(MODULES), help="only these (default: all)")
    parser.add_argument("--sample", type=float, default=1.0, help="fraction of each module's mutants to run")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=2, help="children at once, each in its own copy of the tree")
    parser.add_argument("--root", type=Path, default=ROOT, help="the tree to test (default: this checkout)")
    parser.add_argument("--list", action="store_true", help="list the mutants and run nothing")
    args = parser.parse_args(argv)
    modules = args.module or list(MODULES)
    if args.list:
        for module in modules:
            for mutant in mutants_of(module, (ROOT / module).read_text()):
                print(mutant.key)
        return
    result = run(modules, args.sample, args.seed, args.jobs, args.root)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
