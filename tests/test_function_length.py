"""Orchestration reads as named steps: no function of the training, flow and sweep packages
runs past 80 lines (its whole span: signature, docstring and body, nested functions included).
The measure is a pure function of source text, tested on a made-up module first so that it
can fail."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "sepp_ray"
PACKAGES = ("train", "flow", "tune")
LIMIT = 80


def long_functions(source: str, limit: int = LIMIT) -> list[tuple[str, int]]:
    """(name, lines) of every function or method in ``source`` longer than ``limit`` lines."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            lines = (node.end_lineno or node.lineno) - first + 1
            if lines > limit:
                found.append((node.name, lines))
    return found


def _function(name: str, body_lines: int, indent: str = "") -> str:
    body = "".join(f"{indent}    x{i} = {i}\n" for i in range(body_lines))
    return f"{indent}def {name}() -> None:\n{body}"


def test_the_measure_finds_a_long_function_and_method_and_spares_short_ones() -> None:
    source = (
        _function("short", LIMIT - 1)
        + _function("long", LIMIT)  # 1 + 80 lines
        + "class C:\n"
        + _function("method", LIMIT + 5, indent="    ")
        + "@staticmethod\n"
        + _function("decorated", LIMIT - 1)  # the decorator's line counts: 81
    )
    assert sorted(long_functions(source)) == [
        ("decorated", LIMIT + 1),
        ("long", LIMIT + 1),
        ("method", LIMIT + 6),
    ]


def test_no_function_in_train_flow_or_tune_runs_past_80_lines() -> None:
    files = [f for pkg in PACKAGES for f in sorted((ROOT / pkg).rglob("*.py"))]
    assert files
    too_long = [
        f"{f.relative_to(ROOT.parent)}:{name} has {lines} lines"
        for f in files
        for name, lines in long_functions(f.read_text())
    ]
    assert not too_long, "split these into named steps:\n" + "\n".join(too_long)
