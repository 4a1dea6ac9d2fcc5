"""LoRA flow maps in JAX (`flowmap_jax.core.lora`, the trainer's LoRA mode, `conversion export --lora/--merge`),
checked against peft and diffusers running live:

- the default targets are exactly the modules peft adapts for diffusers' LCM-LoRA target list, on the tiny SD 1.5
  and SDXL UNets and the digits teacher;
- the merged kernels (W + (alpha / r) B A, Linear and Conv2d) give the UNet output of peft's unmerged adapters;
- the exported file loads with diffusers' own `load_lora_adapter` and gives the JAX output;
- the untrained LoRA student is the full student bit for bit; training moves only the adapters and inputs;
  a resume on other base weights is refused naming the folder; --merge and --lora give the same samples.

Tolerances: float32 UNet outputs of magnitude ~2 agree to 2e-6 between the Flax port with merged kernels and
torch with peft's adapters (measured 1.7e-6 on the tiny SD 1.5 UNet); 1e-4 is used below.
"""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flowmap_jax.core import lora
from flowmap_jax.spec.lora_format import DEFAULT_LORA_TARGETS

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

TOL = 1e-4
DIGITS_RUN = ["--run.quality_samples", "0", "--run.progress_bar", "false", "--run.compilation_cache", "",
              "--data.batch_size", "8", "--optim.warmup_steps", "1", "--sample.jumps", "1", "--sample.grid_columns", "2",
              "--objective.options", json.dumps({"teacher_steps": 1, "teacher_solver": "ddim"})]


def _diffusers_unet(folder):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(folder).eval()


def _flax_base(unet):
    from flowmap_jax.unet.state_dict import state_dict_to_flax

    return state_dict_to_flax(dict(unet.state_dict()), dict(unet.config))


def _peft_modules(unet, targets):
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), init_lora_weights="gaussian"))
    return sorted(name for name, module in unet.named_modules()
                  if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}))


@pytest.mark.parametrize("which", ["sd15", "sdxl", "digits"])
def test_default_targets_are_the_modules_peft_adapts(which, request):
    from flowmap_jax.data.teacher_folder import embedded_teacher_folder

    folder = {"sd15": lambda: request.getfixturevalue("sd15_pipeline") / "unet",
              "sdxl": lambda: request.getfixturevalue("sdxl_pipeline") / "unet",
              "digits": lambda: f"{embedded_teacher_folder()}/unet"}[which]()
    unet = _diffusers_unet(folder)
    base = _flax_base(unet)
    ours = sorted(lora.module_name(path) for path in lora.adapted_modules(base, DEFAULT_LORA_TARGETS))
    assert ours == _peft_modules(unet, DEFAULT_LORA_TARGETS)
    assert len(ours) > 20


def _random_peft_adapters(unet, seed=0):
    torch.manual_seed(seed)
    for module in unet.modules():
        if hasattr(module, "lora_B") and "default" in getattr(module, "lora_B", {}):
            torch.nn.init.normal_(module.lora_B["default"].weight, std=0.05)


def _inputs(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, unet.config.in_channels, 8, 8, generator=g)
    t = torch.tensor([10.0, 700.0])
    ctx = torch.randn(2, 5, unet.config.cross_attention_dim, generator=g)
    return x, t, ctx


def _flax_out(config, params, x, t, ctx):
    from flowmap_jax.unet import FlaxUNet2DConditionModel, UNetConfig

    model = FlaxUNet2DConditionModel(UNetConfig.from_dict(dict(config)))
    out = model.apply({"params": params}, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)), jnp.asarray(t.numpy()),
                      jnp.asarray(ctx.numpy()))
    return np.asarray(out).transpose(0, 3, 1, 2)


def test_merged_kernels_give_peft_adapters_output_and_export_loads_in_diffusers(sd15_pipeline):
    """peft's unmerged adapters (alpha 8, rank 4: scale 2) on Linear and Conv2d modules = the Flax UNet with
    `merge_params`; the exported state dict (scale folded into lora_B) loads with `load_lora_adapter` into a fresh
    UNet and gives the same output."""
    from peft import get_peft_model_state_dict

    unet = _diffusers_unet(sd15_pipeline / "unet")
    base = _flax_base(unet)
    _peft_modules(unet, DEFAULT_LORA_TARGETS)
    _random_peft_adapters(unet)
    adapters = lora.adapters_from_lora_state_dict(get_peft_model_state_dict(unet), "peft")
    assert {p[-1][:4] for p, _ in lora.adapter_pairs(adapters)} >= {"conv", "to_q"}  # Conv2d and Linear both
    merged = lora.merge_params(base, {"adapters": adapters, "inputs": {}}, 8 / 4)
    x, t, ctx = _inputs(unet)
    with torch.no_grad():
        reference = unet(x, t, encoder_hidden_states=ctx).sample.numpy()
    ours = _flax_out(unet.config, merged, x, t, ctx)
    assert np.abs(_flax_out(unet.config, base, x, t, ctx) - reference).max() > 100 * TOL  # the adapters matter
    assert np.abs(ours - reference).max() < TOL

    fresh = _diffusers_unet(sd15_pipeline / "unet")
    state = lora.adapters_to_lora_state_dict(adapters, 8 / 4)
    assert all(k.startswith("unet.") and (".lora_A.weight" in k or ".lora_B.weight" in k) for k in state)
    fresh.load_lora_adapter({k: torch.from_numpy(v) for k, v in state.items()}, prefix="unet", adapter_name="fm")
    with torch.no_grad():
        loaded = fresh(x, t, encoder_hidden_states=ctx).sample.numpy()
    assert np.abs(loaded - ours).max() < TOL
    # And back: the file's adapters read into JAX with scale 1 give the same kernels.
    again = lora.merge_params(base, {"adapters": lora.adapters_from_lora_state_dict(state, "file"), "inputs": {}}, 1.0)
    assert np.abs(_flax_out(unet.config, again, x, t, ctx) - ours).max() < TOL


def test_unknown_targets_and_bad_settings_are_errors():
    with pytest.raises(ValueError, match="match no Linear or Conv2d"):
        lora.init_adapters({"conv_in": {"kernel": np.zeros((3, 3, 4, 8))}}, lora.LoraSettings.create(2, None, ("to_q",)),
                           jax.random.key(0))
    with pytest.raises(ValueError, match="lora_rank must be a positive integer"):
        lora.LoraSettings.create(0)
    with pytest.raises(ValueError, match="lora_alpha must be > 0"):
        lora.LoraSettings.create(4, -1.0)


def _digits_config(tmp_path, *extra):
    from flowmap_jax.training.train_cli import parse_args

    return parse_args(["--run.dir", str(tmp_path / "run"), *DIGITS_RUN, *extra])


def test_untrained_lora_student_is_the_full_student_bit_for_bit(tmp_path):
    """float32: merge(teacher weights, untrained adapters (B = 0) + the flow map's inputs) is the full student's
    tree, leaf for leaf, so the flow map's outputs are bit-identical; the trainable tree holds only the adapters and
    the inputs."""
    from flowmap_jax.training import assembly

    full = assembly.build(_digits_config(tmp_path), None)
    low = assembly.build(_digits_config(tmp_path, "--model.lora_rank", "4", "--model.lora_alpha", "8"), None)
    assert set(low.params) == {"adapters", "inputs"} and set(low.params["inputs"]) == {"class_embedding"}
    merged = lora.merge_params(low.teacher.params, low.params, 2.0)
    flat_full = dict(jax.tree_util.tree_flatten_with_path(full.params)[0])
    flat_merged = dict(jax.tree_util.tree_flatten_with_path(merged)[0])
    assert flat_full.keys() == flat_merged.keys()
    for key, value in flat_full.items():
        np.testing.assert_array_equal(np.asarray(flat_merged[key]), np.asarray(value), err_msg=str(key))
    noise, cond, _ = full.eval_inputs(4, 0)
    a = full.sample_flow(full.params, full.teacher, noise, cond, 2)
    b = low.sample_flow(low.params, low.teacher, noise, cond, 2)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    trainable = sum(x.size for x in jax.tree.leaves(low.params))
    assert trainable < 0.25 * sum(x.size for x in jax.tree.leaves(full.params))


def _copy_digits_teacher(tmp_path):
    from flowmap_jax.data.teacher_folder import embedded_teacher_folder

    folder = tmp_path / "teacher"
    shutil.copytree(embedded_teacher_folder(), folder)
    return folder


def test_lora_run_trains_adapters_resumes_only_on_its_base_and_exports(tmp_path, capsys):
    """A 2-step LoRA run (FSDP over 2 of the 8 simulated devices, bf16, the eulerian JVP objective): checkpoints
    hold only {adapters, inputs} plus the base fingerprint; a resume after the teacher's weights changed is refused
    naming the folder; `export` writes the LoRA folder by default, `--merge` a full export whose samples equal the
    LoRA's loaded onto the base; `--lora` on a full run is an error."""
    from safetensors.numpy import load_file, save_file

    from conversion.__main__ import main as conversion_main
    from flowmap_jax import train
    from flowmap_jax.core.export_loading import jax_flow_map, load_flow_map_export
    from flowmap_jax.core.lora_loading import load_lora_flow_map
    from flowmap_jax.core.samplers import flow_map_sample
    from flowmap_jax.spec.time_grid import time_grid
    from flowmap_jax.training.checkpointing import read_checkpoint_params
    from flowmap_jax.unet.diffusers_io import load_diffusers_unet

    teacher = _copy_digits_teacher(tmp_path)
    run = tmp_path / "run"
    args = ["--run.dir", str(run), "--teacher.path", str(teacher), *DIGITS_RUN, "--model.lora_rank", "4",
            "--model.dtype", "bfloat16", "--mesh.data", "4", "--mesh.fsdp", "2", "--mesh.fsdp_min_size", "1",
            "--objective.names", "eulerian", "--objective.options", "{}", "--run.checkpoint_every", "1"]
    assert train.main([*args, "--run.steps", "2"]) == 0
    loaded = read_checkpoint_params(run, "params")
    assert set(loaded.params) == {"adapters", "inputs"}
    assert loaded.meta["extra"]["lora_base"]["sha256"] == lora.base_fingerprint(
        load_diffusers_unet(str(teacher), "unet")[1])
    b = [np.abs(x["lora_B"]["kernel"]).max() for _, x in lora.adapter_pairs(loaded.params["adapters"])]
    assert max(b) > 0  # the adapters moved

    lora_out, merged_out = tmp_path / "lora", tmp_path / "merged"
    assert conversion_main(["export", str(run), str(lora_out)]) == 0
    assert conversion_main(["export", str(run), str(merged_out), "--merge"]) == 0
    on_base = load_lora_flow_map(teacher, lora_out)
    full = load_flow_map_export(merged_out)
    x = np.random.default_rng(0).standard_normal((4, 16, 16, 1)).astype(np.float32)
    cond = {"encoder_hidden_states": on_base.label_table()[np.arange(4)][:, None, :]}
    grid = time_grid(on_base.config.schedule, 2)
    a = flow_map_sample(jax_flow_map(on_base), on_base.params, jnp.asarray(x), grid, cond)
    b = flow_map_sample(jax_flow_map(full), full.params, jnp.asarray(x), grid, cond)
    assert np.abs(np.asarray(a) - np.asarray(b)).max() < TOL

    # Other base weights: the resume is refused (exit 2), naming the teacher folder; export refuses too.
    weights = teacher / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    key = sorted(state)[0]
    state[key] = state[key] + 1e-3
    save_file(state, str(weights))
    capsys.readouterr()
    assert train.main([*args, "--run.steps", "3"]) == 2
    assert "not the ones this LoRA run was trained on" in capsys.readouterr().err
    assert conversion_main(["export", str(run), str(tmp_path / "other")]) != 0
    assert "not the ones the LoRA run" in capsys.readouterr().err



@pytest.mark.parametrize("objective", ["pairs", "eulerian", "lagrangian", "progressive"])
def test_every_objective_sends_gradients_to_the_adapters_and_inputs_only(tmp_path, objective):
    """The LoRA loss (`core.lora.on_merged_params`) of each objective, the JVP ones included: finite, and its
    gradient reaches every lora_B (zero at init, so only through the merged kernels) and the flow map's inputs;
    the teacher's arrays get none (they are not arguments of the gradient)."""
    from flowmap_jax.training import assembly

    config = _digits_config(tmp_path, "--model.lora_rank", "2", "--objective.names", objective,
                            "--objective.options", "{}")
    parts = assembly.build(config, None)
    batch = parts.dataset.get(np.arange(2))
    batch = {"x0": batch["x0"], "cond": batch["cond"], "step": np.full((2,), 10, np.int32)}
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(jnp.arange(2))
    (loss, _), grads = jax.jit(jax.value_and_grad(parts.loss_fn, has_aux=True))(parts.params, parts.teacher, batch,
                                                                                 keys)
    assert np.isfinite(float(loss))
    assert jax.tree.structure(grads) == jax.tree.structure(parts.params)
    b_norms = {lora.module_name(path): float(jnp.abs(pair["lora_B"]["kernel"]).max())
               for path, pair in lora.adapter_pairs(grads["adapters"])}
    assert all(np.isfinite(list(b_norms.values())))
    # Every adapter but the cross-attention queries and keys gets a gradient: the digits context is one token, so
    # the softmax over it is 1 whatever attn2.to_q and attn2.to_k do.
    zero = sorted(name for name, norm in b_norms.items() if norm == 0)
    assert zero == sorted(name for name in b_norms if name.endswith(("attn2.to_q", "attn2.to_k"))), zero
    assert float(jnp.abs(grads["inputs"]["class_embedding"]["linear_2"]["kernel"]).max()) > 0


def test_base_architecture_check_takes_diffusers_defaults_and_per_block_lists():
    """A config that leaves a key to diffusers' default, or gives a per-block list of one value, is the same
    architecture; a different width is refused naming the key."""
    from flowmap_jax.spec.export_format import ExportFormatError
    from flowmap_jax.spec.lora_format import architecture, check_base_architecture

    recorded = architecture({"block_out_channels": [32, 64], "cross_attention_dim": 16, "attention_head_dim": 8})
    resolved = {"block_out_channels": [32, 64], "cross_attention_dim": 16, "attention_head_dim": [8, 8],
                "mid_block_type": "UNetMidBlock2DCrossAttn", "layers_per_block": 2, "in_channels": 4}
    check_base_architecture(resolved, recorded, "lora/flowmap.json", "base/config.json")
    with pytest.raises(ExportFormatError, match=r"base/config.json: key 'cross_attention_dim' is 24 .* "
                                                r"cross_attention_dim=16"):
        check_base_architecture(dict(resolved, cross_attention_dim=24), recorded, "lora/flowmap.json",
                                "base/config.json")
