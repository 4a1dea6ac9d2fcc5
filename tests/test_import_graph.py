"""The import graph, read from the source with `ast` (every `import`, also those inside functions):

- no import cycle among the modules of `flowmap_jax` (a lazy import inside a function counts: it is how
  circles hide);
- nothing under `flowmap_jax/spec/` imports jax, flax, optax, orbax, chex, another package of the "jax" extra
  or torch, nor any `flowmap_jax` module outside `spec` (the specification is the bottom layer);
- nothing in `torch_ref` imports jax, flax, optax, orbax or chex, nor `conversion`, directly or through what it
  imports; nor any other package of the "jax" extra (`cli_exit.EXTRAS`: sklearn, tyro, tensorboardX...), so
  `pip install "flowmap-jax[torch]"` samples (`tests/test_sampling_without_jax.py` runs it), except that the
  digits teacher's trainer (`torch_ref.train_digits_teacher`) reads the digits data through scikit-learn;
- `flowmap_jax` never imports `torch_ref`, and `flowmap_jax.sample` does not reach `conversion`;
- `conversion` (the command line) imports nothing from the trainer (TRAINER), and no `flowmap_jax` module
  imports `conversion` (the export writer is `flowmap_jax.training.export_writer`).
"""

import ast
import os
from pathlib import Path

from flowmap_jax.cli.cli_exit import EXTRAS

ROOT = Path(__file__).resolve().parents[1]
FRAMEWORKS = {"jax", "jaxlib", "flax", "optax", "orbax", "chex"}
JAX_EXTRA = FRAMEWORKS | set(EXTRAS["jax"])  # what `pip install "flowmap-jax[torch]"` does not install
# The trainer: its story, step, configuration's command line, parts, data and run folder. Not in it: the run
# record that a finished run is read through (run_record, checkpointing's reader, rejected_checkpoints,
# run_provenance, the config schema of config.json), the export writers (full and LoRA), which `conversion export` calls, and
# the processes' barrier (`distributed.sync`, which checkpointing's reader calls after setting a checkpoint aside).
RUN_RECORD = {f"flowmap_jax.training.{name}" for name in (
    "run_record", "checkpointing", "rejected_checkpoints", "run_provenance", "config", "export_writer",
    "lora_export_writer", "export_command", "distributed")}
TRAINER = ({f"flowmap_jax.training.{path.stem}" for path in (ROOT / "flowmap_jax" / "training").glob("*.py")
            if path.stem != "__init__"} - RUN_RECORD) | {
    "flowmap_jax.train", "flowmap_jax.write_shards", "flowmap_jax.data.datasets", "flowmap_jax.data.shard_writer",
    "flowmap_jax.core.objectives"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path, module: str) -> set[str]:
    """Every module name `path` imports (absolute; `from a import b` gives a and a.b)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")
                parent = parent[:len(parent) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)
    return out


def _graph(package: str) -> dict[str, set[str]]:
    """{module: modules of the project it imports} for every .py file of `package`."""
    files = sorted((ROOT / package).rglob("*.py"))
    modules = {_module_name(f): f for f in files}
    project = {"flowmap_jax", "torch_ref", "conversion"}
    graph = {}
    for name, path in modules.items():
        graph[name] = {imp for imp in _imports(path, name) if imp.split(".")[0] in project | JAX_EXTRA | {"torch"}}
    return graph


def _resolve(name: str, known: set[str]) -> str | None:
    """The longest known module that `name` is or lies in (`from pkg import function` -> pkg)."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def _project_edges(graph, known):
    edges = {}
    for module, imports in graph.items():
        targets = {_resolve(imp, known) for imp in imports}
        edges[module] = {t for t in targets if t and t != module and not module.startswith(t + ".")
                         and t != module.rpartition(".")[0]}
    return edges


def _find_cycle(edges) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycle_in_flowmap_jax():
    graph = _graph("flowmap_jax")
    known = set(graph)
    edges = {m: {t for t in targets if t.startswith("flowmap_jax")} for m, targets in _project_edges(graph, known).items()}
    assert len(edges) > 30
    cycle = _find_cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_spec_imports_no_framework_and_nothing_above_it():
    graph = _graph("flowmap_jax")
    spec = {m: imports for m, imports in graph.items() if m == "flowmap_jax.spec" or m.startswith("flowmap_jax.spec.")}
    assert len(spec) >= 10
    for module, imports in spec.items():
        bad = sorted(imp for imp in imports if imp.split(".")[0] in JAX_EXTRA | {"torch", "torch_ref", "conversion"})
        assert not bad, f"{module} imports {bad}"
        above = sorted(imp for imp in imports if imp.startswith("flowmap_jax.") and not imp.startswith("flowmap_jax.spec")
                       and imp != "flowmap_jax.__version__")
        assert not above, f"{module} imports {above} (outside the spec layer)"


def _reachable(edges, start):
    seen, todo = set(), [start]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(edges.get(module, ()))
    return seen


def test_torch_ref_imports_no_jax_and_flowmap_jax_no_torch_ref():
    """Directly or through the project modules it imports (lazily or not), torch_ref reaches no jax and no other
    package of the "jax" extra (the digits teacher's trainer: scikit-learn, for the digits data)."""
    graph = {**_graph("flowmap_jax"), **_graph("torch_ref"), **_graph("conversion")}
    edges = _project_edges(graph, set(graph))
    for module in _graph("torch_ref"):
        allowed = {"sklearn"} if module == "torch_ref.train_digits_teacher" else set()
        for reached in sorted(_reachable(edges, module)):
            bad = sorted(imp for imp in graph[reached]
                         if imp.split(".")[0] in (JAX_EXTRA - allowed) | {"conversion"})
            assert not bad, f"{module} reaches {reached}, which imports {bad}"
    for module, imports in _graph("flowmap_jax").items():
        assert not any(imp.split(".")[0] == "torch_ref" for imp in imports), module


def test_flowmap_jax_sample_does_not_reach_conversion():
    graph = {**_graph("flowmap_jax"), **_graph("conversion")}
    known = set(graph)
    edges = _project_edges(graph, known)
    seen = _reachable(edges, "flowmap_jax.sample")
    assert not any(m.split(".")[0] == "conversion" for m in seen), sorted(m for m in seen if m.startswith("conversion"))
    assert "flowmap_jax.core.export_loading" in seen and "flowmap_jax.cli.sample_cli" in seen


def test_every_python_file_parses():
    for package in ("flowmap_jax", "torch_ref", "conversion"):
        for path in (ROOT / package).rglob("*.py"):
            ast.parse(path.read_text(), filename=os.fspath(path))


def test_conversion_imports_nothing_from_the_trainer():
    graph = {**_graph("flowmap_jax"), **_graph("conversion")}
    assert TRAINER <= set(graph), sorted(TRAINER - set(graph))  # the list names modules that exist
    edges = _project_edges(graph, set(graph))
    conversion = {m: targets for m, targets in edges.items() if m.split(".")[0] == "conversion"}
    assert "conversion.cli_commands" in conversion and "conversion.export" in conversion
    for module, targets in conversion.items():
        assert not targets & TRAINER, f"{module} imports {sorted(targets & TRAINER)} (the trainer)"
    # ... nor through what it imports (the export writer reads a run through the run record only).
    reached, todo = set(), [m for m in conversion]
    while todo:
        for target in edges.get(todo.pop(), ()):
            if target not in reached:
                reached.add(target)
                todo.append(target)
    assert RUN_RECORD <= set(graph) and "flowmap_jax.training.export_writer" in reached
    assert not reached & TRAINER, f"conversion reaches {sorted(reached & TRAINER)} (the trainer)"


def test_flowmap_jax_never_imports_conversion():
    for module, imports in _graph("flowmap_jax").items():
        assert not any(imp.split(".")[0] == "conversion" for imp in imports), module


# The layer folders of flowmap_jax, lowest first (docs/ARCHITECTURE.md, "Layers are folders"): a module imports
# only from its own level or below. Modules at the top of the package (the commands) are the highest level.
LAYER_LEVELS = {"spec": 0, "cli": 1, "unet": 2, "digits": 2, "data": 2, "core": 3, "training": 4}
COMMANDS_LEVEL = 5


def _level(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "flowmap_jax" or len(parts) == 1 or module == "flowmap_jax.__version__":
        return None
    return LAYER_LEVELS.get(parts[1], COMMANDS_LEVEL)


def test_layers_import_only_their_level_or_below():
    graph = _graph("flowmap_jax")
    edges = _project_edges(graph, set(graph))
    folders = {m.split(".")[1] for m in graph if m.count(".") >= 2}
    assert folders == set(LAYER_LEVELS), f"layer folders {sorted(folders)} vs the table {sorted(LAYER_LEVELS)}"
    checked = 0
    for module, targets in edges.items():
        source = _level(module)
        for target in targets:
            level = _level(target)
            if source is None or level is None:
                continue
            checked += 1
            assert level <= source, f"{module} (level {source}) imports {target} (level {level}): an upward import"
    assert checked > 100
