"""docs/ARCHITECTURE.md's module tables match the code: every module of flowmap_jax, torch_ref and conversion
is named exactly once, in the table of the folder it lives in, and every name in the tables exists."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "ARCHITECTURE.md"
ROW = re.compile(r"^\| `(?P<path>[\w/.]+)` \|")


def _table_rows() -> list[tuple[str, str]]:
    """(section heading, path) for each module-table row; a path ending in '/' names a package as one module."""
    rows, heading = [], ""
    for line in DOC.read_text().splitlines():
        if line.startswith("### "):
            heading = line
        match = ROW.match(line)
        if match:
            rows.append((heading, match["path"]))
    return rows


def _modules() -> set[str]:
    """Every .py file (not __init__.py) of the three packages; spec/schedule/ counts as one (its own package)."""
    found = set()
    for package in ("flowmap_jax", "torch_ref", "conversion"):
        for path in (ROOT / package).rglob("*.py"):
            relative = path.relative_to(ROOT).as_posix()
            if path.name == "__init__.py" and package != "conversion":
                continue
            if relative.startswith("flowmap_jax/spec/schedule/"):
                relative = "flowmap_jax/spec/schedule/"
            if relative == "conversion/__init__.py":
                continue
            found.add(relative)
    return found


def test_every_module_is_named_once_in_its_folders_table():
    rows = _table_rows()
    paths = [path for _, path in rows]
    assert len(paths) > 60
    duplicates = sorted({p for p in paths if paths.count(p) > 1})
    assert not duplicates, f"named more than once: {duplicates}"
    modules = _modules()
    assert sorted(modules - set(paths)) == [], "modules missing from docs/ARCHITECTURE.md"
    assert sorted(set(paths) - modules) == [], "docs/ARCHITECTURE.md names modules that do not exist"
    for heading, path in rows:  # each table is its folder's
        folder = path.rstrip("/").rsplit("/", 1)[0] if path.count("/") > 1 or path.endswith("/") else path.split("/")[0]
        if path.startswith("flowmap_jax/spec/schedule"):
            folder = "flowmap_jax/spec"
        assert f"`{folder}/`" in heading, f"{path} is in the table '{heading}'"
