"""Measure: how many of a module's lines are code, and how many explain it.

For each module: its lines (`wc -l`), and its floor: the lines left once every docstring, comment
line and trailing comment is removed (`# fmt: skip` kept) and ruff formats the rest at the
project's settings, which puts back only the blank lines it requires. No version of a module that
keeps its code can be shorter than its floor; a line goal below the floor asks for less code.

    python benchmarks/code_size.py pipeline/*.py
    python benchmarks/code_size.py pipeline/tune.py pipeline/study.py pipeline/trial_process.py
"""

from __future__ import annotations

import argparse
import ast
import io
import subprocess
import sys
import tempfile
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def docstring_lines(tree: ast.Module) -> tuple[set[int], set[int]]:
    """(lines to drop, lines to turn into `pass`: a docstring that is a body's only statement)."""
    drop: set[int] = set()
    to_pass: set[int] = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Module | ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            continue
        first = node.body[0] if node.body else None
        if not (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)):
            continue
        if not isinstance(first.value.value, str):
            continue
        end = first.end_lineno or first.lineno
        if len(node.body) == 1 and not isinstance(node, ast.Module):
            to_pass.add(first.lineno)
            drop.update(range(first.lineno + 1, end + 1))
        else:
            drop.update(range(first.lineno, end + 1))
    return drop, to_pass


def floor(source: str) -> str:
    """The module without docstrings, comments and blank lines, formatted by ruff."""
    lines = source.splitlines(keepends=True)
    drop, to_pass = docstring_lines(ast.parse(source))
    comments = {
        token.start[0]: token.start[1]
        for token in tokenize.generate_tokens(io.StringIO(source).readline)
        if token.type == tokenize.COMMENT and "fmt:" not in token.string
    }
    kept = []
    for number, line in enumerate(lines, start=1):
        if number in to_pass:
            line = line[: len(line) - len(line.lstrip())] + "pass\n"
        elif number in drop:
            continue
        elif number in comments:
            line = line[: comments[number]].rstrip() + "\n"
        if line.strip():
            kept.append(line)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "module.py"
        path.write_text("".join(kept))
        ruff = Path(sys.executable).with_name("ruff")
        config = ROOT / "pyproject.toml"
        subprocess.run([ruff, "format", "--quiet", "--config", config, path], check=True)
        return path.read_text()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="+", type=Path)
    args = parser.parse_args()
    total = total_floor = 0
    for module in args.modules:
        source = module.read_text()
        lines, least = len(source.splitlines()), len(floor(source).splitlines())
        total, total_floor = total + lines, total_floor + least
        print(f"{module}: {lines} lines, floor {least}")
    print(f"all {len(args.modules)}: {total} lines, floor {total_floor}")


if __name__ == "__main__":
    main()
