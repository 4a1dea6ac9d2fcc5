"""benchmarks/mutation_score.py without running a mutation: every entry's snippet is found exactly once, every
entry names in `kills` a non-twin test (not one comparing JAX with PyTorch) that exists and that its own test
selection runs, and a snippet that is gone fails the script (exit 1, listed) instead of counting quietly."""

import ast
import os

import pytest

from benchmarks import mutation_score as ms


def _test_functions(path):
    with open(os.path.join(ms.ROOT, path), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    return {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}


@pytest.mark.parametrize("mutation", ms.MUTATIONS, ids=lambda m: m.name)
def test_entry_is_found_once_and_names_a_non_twin_killer(mutation):
    path, reason = ms.locate(mutation)
    assert path is not None, f"{mutation.name}: {reason}"
    assert "::" in mutation.kills, f"{mutation.name}: kills must be file::test_name, got {mutation.kills!r}"
    file, name = mutation.kills.split("::", 1)
    assert name in _test_functions(file), f"{mutation.name}: no test {name} in {file}"
    for twin in ms.TWIN_TESTS:
        assert not (mutation.kills == twin or mutation.kills.startswith(twin + "::") or file == twin), (
            f"{mutation.name}: killed by a twin test {mutation.kills}")
    selected = [item for item in mutation.tests if item.startswith("tests/")]
    assert any(item == file or item.startswith(file + "::" + name) for item in selected), (
        f"{mutation.name}: its tests {mutation.tests} do not run {mutation.kills}")
    if "-k" in mutation.tests and not any("::" in item for item in selected):
        expr = mutation.tests[mutation.tests.index("-k") + 1]
        words = [w for w in expr.replace("(", " ").replace(")", " ").split() if w not in ("and", "or", "not")]
        assert any(w in name for w in words), f"{mutation.name}: -k {expr!r} may deselect {name}"


def test_names_are_unique():
    names = [m.name for m in ms.MUTATIONS]
    assert len(names) == len(set(names))


def test_a_snippet_that_is_gone_fails_the_script(monkeypatch, capsys):
    gone = ms.Mutation("gone", "flowmap_jax/*", "this snippet is in no file", "x", ("tests/test_mutation_score.py",),
                       kills="tests/test_mutation_score.py::test_names_are_unique")
    twice = ms.Mutation("twice", "*", "import", "x", ("tests/test_mutation_score.py",),
                        kills="tests/test_mutation_score.py::test_names_are_unique")
    monkeypatch.setattr(ms, "MUTATIONS", [ms.MUTATIONS[0], gone, twice])
    assert ms.main(["--list"]) == 1
    err = capsys.readouterr().err
    assert "gone: not found" in err and "twice: ambiguous" in err
    monkeypatch.setattr(ms, "MUTATIONS", [ms.MUTATIONS[0]])
    assert ms.main(["--list"]) == 0
