"""Deliberate copies between the backends stay copies (diffusers' `# Copied from`, kept honest by its
`utils/check_copies.py`).

A function or class of `torch_ref` that is identical by design to one of `flowmap_jax` carries, on the line
above its `def`/`class` (above its decorators, if any):

    # Copied from flowmap_jax.<module path>.<qualified name>
    # Copied from flowmap_jax.<module path>.<qualified name> with jnp->torch, x->y

and this test fails when the two copies drift: the marked definition's source must equal the original's,
after the listed plain-text replacements. A marker whose original is gone fails too. Both sides are read
as source text (`ast`), nothing is imported. The docstring of the copy counts: write it for both backends.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"^(?P<indent>[ \t]*)# Copied from (?P<target>[\w.]+)(?: with (?P<subs>.+))?\s*$")


def _source_file(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise LookupError(f"module {module} not found")
    return Path(spec.origin)


def _definitions(path: Path) -> dict[str, tuple[int, str]]:
    """qualified name -> (first line of the definition, decorators included; its source), for every def and
    class in the file (methods as Class.method)."""
    text = path.read_text()
    lines = text.splitlines()
    found: dict[str, tuple[int, str]] = {}

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = prefix + child.name
                start = min([child.lineno] + [d.lineno for d in child.decorator_list])
                found[name] = (start, "\n".join(lines[start - 1:child.end_lineno]))
                if isinstance(child, ast.ClassDef):
                    visit(child, name + ".")

    visit(ast.parse(text), "")
    return found


def _split_target(target: str) -> tuple[str, str]:
    """'pkg.mod.Class.method' -> ('pkg.mod', 'Class.method'): the longest prefix that is a module."""
    parts = target.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        module = ".".join(parts[:cut])
        try:
            if importlib.util.find_spec(module) is not None:
                return module, ".".join(parts[cut:])
        except ModuleNotFoundError:
            continue
    raise LookupError(f"no module in {target!r}")


def _replacements(subs: str | None) -> list[tuple[str, str]]:
    if not subs:
        return []
    pairs = []
    for item in subs.split(","):
        old, sep, new = item.strip().partition("->")
        if not sep or not old:
            raise ValueError(f"bad replacement {item!r} (expected old->new)")
        pairs.append((old, new))
    return pairs


def copy_drifts(path: Path) -> list[str]:
    """One message per marker in `path` whose definition differs from its original (or points nowhere)."""
    lines = path.read_text().splitlines()
    definitions = _definitions(path)
    by_start = {start: (name, source) for name, (start, source) in definitions.items()}
    problems = []
    for number, line in enumerate(lines, start=1):
        match = MARKER.match(line)
        if not match:
            continue
        where = f"{path.name}:{number}"
        if number + 1 not in by_start:
            problems.append(f"{where}: the marker is not directly above a def or class")
            continue
        name, copy = by_start[number + 1]
        try:
            module, qualified = _split_target(match["target"])
            originals = _definitions(_source_file(module))
        except LookupError as error:
            problems.append(f"{where}: {match['target']}: {error}")
            continue
        if qualified not in originals:
            problems.append(f"{where}: {match['target']} does not exist")
            continue
        original = originals[qualified][1]
        # Same indentation on both sides (a method may be copied into a function and back).
        original = _reindent(original, len(match["indent"]))
        for old, new in _replacements(match["subs"]):
            original = original.replace(old, new)
        if original != copy:
            diff = "\n".join(difflib.unified_diff(original.splitlines(), copy.splitlines(), match["target"],
                                                  f"{path.name}:{name}", lineterm="", n=1))
            problems.append(f"{where}: {name} drifted from {match['target']}:\n{diff}")
    return problems


def _reindent(source: str, indent: int) -> str:
    lines = source.splitlines()
    current = len(lines[0]) - len(lines[0].lstrip())
    shift = indent - current
    if shift == 0:
        return source
    out = []
    for line in lines:
        out.append(" " * shift + line if shift > 0 and line else line[-shift:] if shift < 0 and line else line)
    return "\n".join(out)


def _marked_files():
    return sorted(p for p in (ROOT / "torch_ref").rglob("*.py") if "# Copied from" in p.read_text())


def test_there_are_marked_copies():
    """The twins do share identical functions (predictions, flow-map helpers ...): they are marked."""
    assert len(_marked_files()) >= 3


@pytest.mark.parametrize("path", _marked_files(), ids=lambda p: p.name)
def test_marked_copies_match_their_originals(path):
    problems = copy_drifts(path)
    assert not problems, "\n".join(problems)


def test_a_drifted_copy_is_caught(tmp_path):
    """The checker itself: a copy that differs by one token, a wrong replacement, and a missing original."""
    original = ROOT / "flowmap_jax"
    assert original.is_dir()
    copy = tmp_path / "twin.py"
    copy.write_text(
        "# Copied from tests.test_twin_copies._reindent\n"
        + _definitions(Path(__file__))["_reindent"][1].replace("shift > 0", "shift >= 0") + "\n\n\n"
        "# Copied from tests.test_twin_copies._replacements with pairs->items\n"
        + _definitions(Path(__file__))["_replacements"][1] + "\n\n\n"
        "# Copied from tests.test_twin_copies.no_such_function\n"
        "def no_such_function():\n    pass\n")
    problems = copy_drifts(copy)
    assert len(problems) == 3, problems
    assert "_reindent drifted" in problems[0] and "shift >= 0" in problems[0]
    assert "_replacements drifted" in problems[1]
    assert "does not exist" in problems[2]
    # ... and an exact copy (with a replacement that applies) passes.
    copy.write_text("# Copied from tests.test_twin_copies._reindent with shift->offset\n"
                    + _definitions(Path(__file__))["_reindent"][1].replace("shift", "offset") + "\n")
    assert copy_drifts(copy) == []
