"""Sampling without JAX (issue 27): `pip install "flowmap-jax[torch]"` installs enough to sample an exported flow
map in PyTorch, through every loader a PyTorch user has, and a command that needs the "jax" extra says so on one
line (exit code 2) instead of a traceback.

The checks run in child processes that see only what base + [torch] install. A `sitecustomize.py` first on the
child's PYTHONPATH (`blocked_env`) makes every other installed top-level module unimportable, as if not
installed: `sys.modules[name] = None` (importlib's "not installed": `import jax` raises ModuleNotFoundError and
`importlib.util.find_spec("jax")` is None, so diffusers' and transformers' own availability checks agree) and a
`sys.meta_path` finder that raises ImportError for anything below those names. Blocked: the modules of every
installed distribution outside the closure of pyproject.toml's `dependencies` and `torch` extra (their
requirements, transitively, from the installed metadata), always including the JAX stack (`JAX_STACK`: jax,
jaxlib, flax, optax, orbax, chex, sklearn, tyro, tensorboardX). The test process itself (jax loaded) makes the
same calls; the images must be identical.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("peft")
tomllib = pytest.importorskip("tomllib")  # Python 3.11+
from packaging.requirements import Requirement  # noqa: E402 (a requirement of transformers and diffusers)
from packaging.utils import canonicalize_name  # noqa: E402

from flowmap_jax.cli import cli_exit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
JAX_STACK = ("jax", "jaxlib", "flax", "optax", "orbax", "chex", "sklearn", "tyro", "tensorboardX")
# Installed with every virtual environment (and flowmap-jax itself, whose modules come from this checkout).
ALWAYS_THERE = {"pip", "setuptools", "wheel", "flowmap-jax"}
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

SITECUSTOMIZE = '''
import os
import sys

BLOCKED = frozenset(os.environ["FLOWMAP_TEST_BLOCKED"].split(","))


class BlockedModules:
    """Any module below a blocked name is not installed (the top-level names are None in sys.modules)."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
        return None


sys.meta_path.insert(0, BlockedModules())
for name in BLOCKED:
    sys.modules[name] = None
'''

# First in every child script: the blocker is active, and the JAX stack looks uninstalled to everyone.
CHECK_BLOCKED = f"""
import importlib.util
import sys

for name in {JAX_STACK!r}:
    assert importlib.util.find_spec(name) is None, name
    try:
        __import__(name + ".x")
    except ImportError:
        pass
    else:
        raise AssertionError(name + " imported")


def loaded_blocked():
    blocked = set(__import__("os").environ["FLOWMAP_TEST_BLOCKED"].split(","))
    return sorted(m for m, module in sys.modules.items() if module is not None and m.split(".")[0] in blocked)
"""


def _requirements_closure(requirements: list[str]) -> set[str]:
    """The canonical names of `requirements` and, transitively, of what their installed distributions require
    (markers evaluated here, extras followed); requirements not installed here are kept by name."""
    seen, todo = set(), [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        key = (canonicalize_name(req.name), frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            continue
        environments = [{"extra": extra} for extra in req.extras] or [{"extra": ""}]
        for line in dist.requires or []:
            sub = Requirement(line)
            if sub.marker is None or any(sub.marker.evaluate(env) for env in environments):
                todo.append(sub)
    return {name for name, _ in seen}


def torch_install_closure() -> set[str]:
    """What `pip install "flowmap-jax[torch]"` installs, as far as this environment's metadata tells."""
    return _requirements_closure(PYPROJECT["dependencies"] + PYPROJECT["optional-dependencies"]["torch"])


def blocked_modules() -> list[str]:
    keep = torch_install_closure() | ALWAYS_THERE
    blocked = {module for module, dists in metadata.packages_distributions().items()
               if module.isidentifier() and not any(canonicalize_name(d) in keep for d in dists)}
    return sorted(blocked | set(JAX_STACK))


@pytest.fixture(scope="module")
def blocked_env(tmp_path_factory):
    """Environment variables of a child that sees only base + [torch] (its PYTHONPATH: the blocker, this checkout)."""
    folder = tmp_path_factory.mktemp("blocker")
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE)
    # One torch thread, as in this process (tests/conftest.py): the same float reductions, so identical images.
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(folder), str(ROOT)]), HF_HUB_OFFLINE="1",
                HF_MODULES_CACHE=str(folder / "hf_modules"), OMP_NUM_THREADS="1",
                FLOWMAP_TEST_BLOCKED=",".join(blocked_modules()))


def _run(env, args, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
                          check=False)


def _check(done: subprocess.CompletedProcess) -> None:
    assert done.returncode == 0, f"stdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-6000:]}"


@pytest.fixture(scope="module")
def lora_folder(tmp_path_factory, sd15_pipeline):
    from tests.test_lora_torch import write_lora_folder

    return write_lora_folder(sd15_pipeline, tmp_path_factory.mktemp("lora") / "lora")[0]


# The PyTorch user's calls, run both in a blocked child and in the test process; every result is saved in OUT.
SAMPLING = """
import numpy as np
import torch
from diffusers import DiffusionPipeline
from PIL import Image

from torch_ref.pipeline import FlowMapPipeline
from torch_ref.pipeline_img2img import FlowMapImg2ImgPipeline
from torch_ref.sample import main as sample_main

torch.set_num_threads(1)
FOLDER, BASE, LORA, INIT, OUT = {folder!r}, {base!r}, {lora!r}, {init!r}, {out!r}
PROMPTS = ["a photo of the cat", "two dogs"]


def gen(seed):
    return torch.Generator().manual_seed(seed)


def quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


pipe = quiet(DiffusionPipeline.from_pretrained(FOLDER, trust_remote_code=True))
assert type(pipe).__name__ == "FlowMapPipeline", type(pipe)
np.save(f"{{OUT}}/diffusers_loader.npy", pipe(PROMPTS, num_inference_steps=2, generator=gen(0), output_type="np").images)
pipe = quiet(FlowMapPipeline.from_pretrained(FOLDER))
np.save(f"{{OUT}}/flowmap_pipeline.npy", pipe(PROMPTS, num_inference_steps=1, guidance_scale=2.0, negative_prompt="dark",
                                             generator=gen(1), output_type="np").images)
img2img = quiet(FlowMapImg2ImgPipeline.from_pretrained(FOLDER))
np.save(f"{{OUT}}/img2img.npy", img2img(PROMPTS[0], image=Image.open(INIT), strength=0.6, num_inference_steps=1,
                                       generator=gen(2), output_type="np").images)
lora = quiet(FlowMapPipeline.from_pretrained(BASE))
lora.load_flow_map(LORA)
np.save(f"{{OUT}}/lora.npy", lora(PROMPTS, num_inference_steps=2, generator=gen(3), output_type="np").images)
lora.save_pretrained(f"{{OUT}}/lora_merged")
merged = quiet(DiffusionPipeline.from_pretrained(f"{{OUT}}/lora_merged", trust_remote_code=True))
np.save(f"{{OUT}}/lora_merged.npy", merged(PROMPTS, num_inference_steps=2, generator=gen(3), output_type="np").images)
common = ["--prompt", PROMPTS[0], "--batch", "2", "--steps", "2", "--seed", "4", "--device", "cpu"]
assert sample_main(["--model", BASE, "--lora", LORA, *common, "--out", f"{{OUT}}/cli_lora"]) == 0
assert sample_main(["--model", FOLDER, *common, "--init-image", INIT, "--strength", "0.5",
                    "--out", f"{{OUT}}/cli_img2img"]) == 0
assert sample_main(["--model", FOLDER, *common, "--out", f"{{OUT}}/cli"]) == 0
"""

RESULTS = ["diffusers_loader.npy", "flowmap_pipeline.npy", "img2img.npy", "lora.npy", "lora_merged.npy",
           *(f"{run}/{name}" for run in ("cli_lora", "cli_img2img", "cli")
             for name in ("samples.npy", "noise.npy", "images/0000.png", "images/0001.png", "grid.png"))]


def _read(path: Path):
    return path.read_bytes() if path.suffix == ".png" else np.load(path)


def _same(a, b) -> bool:
    return a == b if isinstance(a, bytes) else (a.shape == b.shape and np.array_equal(a, b))


def test_the_torch_install_samples_exactly_as_with_jax(tmp_path, blocked_env, sd15_pipeline, sd15_flow_pipeline,
                                                       lora_folder):
    """DiffusionPipeline.from_pretrained(trust_remote_code=True), FlowMapPipeline (CFG with a negative prompt),
    FlowMapImg2ImgPipeline, a LoRA flow map on a stock SD folder (load_flow_map, then save_pretrained merged and
    loaded back), torch_ref.sample's main with --lora, --init-image and a pipeline folder, and `python -m
    torch_ref.sample` itself: with only base + [torch] importable, the same images, bit for bit, as the same calls
    in this process (jax loaded)."""
    from PIL import Image

    init = tmp_path / "init.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(init)
    paths = {"folder": str(sd15_flow_pipeline), "base": str(sd15_pipeline), "lora": str(lora_folder),
             "init": str(init)}
    (tmp_path / "blocked").mkdir()
    (tmp_path / "with_jax").mkdir()
    script = CHECK_BLOCKED + SAMPLING.format(**paths, out=str(tmp_path / "blocked")) + textwrap.dedent("""
        assert not loaded_blocked(), loaded_blocked()
    """)
    child = _run(blocked_env, ["-c", script])
    # `python -m torch_ref.sample` as a user types it, in the same environment.
    command = _run(blocked_env, ["-m", "torch_ref.sample", "--model", paths["folder"], "--prompt",
                                 "a photo of the cat", "--batch", "2", "--steps", "2", "--seed", "4", "--device", "cpu",
                                 "--out", str(tmp_path / "blocked" / "command")])
    _check(child)
    _check(command)

    exec(compile(SAMPLING.format(**paths, out=str(tmp_path / "with_jax")), "sampling", "exec"), {})  # noqa: S102
    assert "jax" in sys.modules
    differ = [name for name in RESULTS
              if not _same(_read(tmp_path / "blocked" / name), _read(tmp_path / "with_jax" / name))]
    differ += [f"command/{name}" for name in ("samples.npy", "images/0000.png", "images/0001.png")
               if not _same(_read(tmp_path / "blocked" / "command" / name), _read(tmp_path / "with_jax" / "cli" / name))]
    assert not differ, f"without jax, these differ from the same call with jax: {differ}"
    assert np.isfinite(np.load(tmp_path / "with_jax" / "lora.npy")).all()


def test_the_folders_pipeline_py_without_flowmap_jax_says_what_to_install(tmp_path, blocked_env, sd15_flow_pipeline):
    """The exported pipeline.py where flowmap-jax is not installed (torch_ref and flowmap_jax blocked too):
    diffusers' loader raises an ImportError whose one-line message is the pip command of the torch extra, and
    diffusers does not advise `pip install torch_ref` (the import is by name)."""
    from flowmap_jax.spec.pipeline_folder import PIPELINE_MODULE_SOURCE

    assert (sd15_flow_pipeline / "pipeline.py").read_text() == PIPELINE_MODULE_SOURCE
    env = dict(blocked_env, FLOWMAP_TEST_BLOCKED=blocked_env["FLOWMAP_TEST_BLOCKED"] + ",torch_ref,flowmap_jax")
    done = _run(env, ["-c", textwrap.dedent(f"""
        from diffusers import DiffusionPipeline
        try:
            DiffusionPipeline.from_pretrained({str(sd15_flow_pipeline)!r}, trust_remote_code=True)
        except ImportError as error:
            print("ImportError:", error)
        else:
            raise AssertionError("loaded without flowmap-jax")
    """)])
    _check(done)
    line = done.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"ImportError: .*torch_ref.*: this folder's FlowMapPipeline comes from flowmap-jax; "
                        r'install it with: pip install "flowmap-jax\[torch\]"', line), line
    assert "pip install torch_ref" not in done.stderr, done.stderr[-2000:]


def test_a_folder_with_the_first_pipeline_py_still_loads_without_trust_remote_code(tmp_path, sd15_flow_pipeline):
    """Folders exported before pipeline.py said what to install keep loading through FlowMapPipeline."""
    import shutil

    from flowmap_jax.spec.pipeline_folder import PIPELINE_MODULE_SOURCES
    from torch_ref.pipeline import FlowMapPipeline

    old = tmp_path / "old"
    shutil.copytree(sd15_flow_pipeline, old)
    (old / "pipeline.py").write_text(PIPELINE_MODULE_SOURCES[-1])
    assert "from torch_ref.pipeline import FlowMapPipeline" in PIPELINE_MODULE_SOURCES[-1]
    assert type(FlowMapPipeline.from_pretrained(old)).__name__ == "FlowMapPipeline"


# The commands of the "jax" extra, run by a user who installed [torch] only: (module, argv after --out or a folder).
JAX_COMMANDS = [
    ("flowmap_jax.train", ["--run.dir", "{out}"]),
    ("flowmap_jax.train", ["--help"]),
    ("flowmap_jax.sample", ["--model", "{flow}", "--prompt", "a cat", "--steps", "1", "--out", "{out}"]),
    ("conversion", ["to-flax", "{sd15}", "{out}", "--subfolder", "unet"]),
    ("conversion", ["export", "{flow}/unet", "{out}"]),
    ("flowmap_jax.digits.train_classifier", ["--steps", "1", "--out", "{out}"]),
    ("flowmap_jax.write_shards", ["--source", "digits", "--out", "{out}"]),
]


@pytest.mark.parametrize("module, argv", JAX_COMMANDS, ids=[f"{m} {a[0]}" for m, a in JAX_COMMANDS])
def test_a_jax_command_without_jax_is_one_line_and_exit_2(tmp_path, blocked_env, sd15_pipeline, sd15_flow_pipeline,
                                                          module, argv):
    out = tmp_path / "out"
    argv = [a.format(out=out, flow=sd15_flow_pipeline, sd15=sd15_pipeline) for a in argv]
    done = _run(blocked_env, ["-m", module, *argv], timeout=300)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1, f"exit {done.returncode}, stderr:\n{done.stderr[-3000:]}"
    assert lines[0].startswith("error: ") and lines[0].endswith(
        '(this needs the "jax" extra: pip install "flowmap-jax[jax]")'), lines[0]
    assert not out.exists()


def test_missing_extra_names_the_extra_only_for_a_package_that_is_not_installed(monkeypatch):
    """cli_exit.missing_extra: an extra's package that is not installed -> the extra (exit 2, one line with the pip
    command); a missing submodule of an installed package, or a module of no extra -> None (a bug: traceback)."""
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # what importlib reads as not installed
    error = ModuleNotFoundError("No module named 'tensorboardX'", name="tensorboardX")
    assert cli_exit.missing_extra(error) == "jax" and cli_exit.exit_code(error) == cli_exit.USAGE
    assert cli_exit.one_line(error) == ("No module named 'tensorboardX' "
                                        '(this needs the "jax" extra: pip install "flowmap-jax[jax]")')
    installed = ModuleNotFoundError("No module named 'torch.no_such_module'", name="torch.no_such_module")
    assert cli_exit.missing_extra(installed) is None and cli_exit.exit_code(installed) is None
    other = ModuleNotFoundError("No module named 'no_such_package'", name="no_such_package")
    assert cli_exit.missing_extra(other) is None and cli_exit.one_line(other) == "No module named 'no_such_package'"
    assert cli_exit.missing_extra("text") is None


def test_pyproject_extras_match_the_modules_cli_exit_names():
    """The base dependencies hold no framework; each extra of `cli_exit.EXTRAS` is a pyproject extra whose
    installed distributions provide exactly the modules named there (jaxlib through jax); [torch] alone does not
    reach the JAX stack."""
    extras = PYPROJECT["optional-dependencies"]
    providers = metadata.packages_distributions()
    base = {canonicalize_name(Requirement(r).name) for r in PYPROJECT["dependencies"]}
    for extra, modules in cli_exit.EXTRAS.items():
        closure = _requirements_closure(extras[extra])
        named = {canonicalize_name(Requirement(r).name) for r in extras[extra]}
        for module in modules:
            dists = {canonicalize_name(d) for d in providers.get(module, [])}
            if dists:  # installed here
                assert dists & closure, f"{module} ({sorted(dists)}) is not installed by the {extra} extra"
                assert not dists & base, f"{module} is in the base dependencies"
        for dist in named:
            provided = {m for m, ds in providers.items() if dist in {canonicalize_name(d) for d in ds}}
            assert not provided or provided & set(modules), f"{dist} of the {extra} extra: no module in EXTRAS"
    reached = torch_install_closure()
    jax_dists = {canonicalize_name(d) for m in JAX_STACK for d in providers.get(m, [])}
    assert not reached & jax_dists, f"[torch] installs {sorted(reached & jax_dists)}"


def test_ci_installs_as_the_readme_says():
    """.ci/run's set-up line is the README's (without -q), and it installs the extras the tests need."""
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    setup = ci[ci.index("# --- README set-up command ---") + 1]
    assert setup.replace(" -q", "") in readme, setup
    assert re.search(r'pip install -e "\.\[jax,torch,dev\]"', setup.replace(" -q", "")), setup
    assert json.dumps(sorted(PYPROJECT["optional-dependencies"])) == json.dumps(["cuda12", "dev", "jax", "torch"])
