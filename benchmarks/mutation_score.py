"""Mutation score: does the test suite catch single-line mistakes in the core, in both backends?

A curated list of single-line mutations (MUTATIONS below) across the UNet port, conversion, schedules,
predictions, samplers, objectives, time pairs, checkpointing and export, JAX and PyTorch. For each one the
script copies the repository to a scratch folder, replaces the exact source snippet (found by searching the
files that match its glob, so it survives modules moving), runs the test files named for it there
(PYTHONPATH = the copy) and records which tests fail. A mutation is killed when at least one test fails.
It prints a table (mutation, file, killed by) and the score. Not part of CI (CPU heavy: each mutation runs
its tests in full).

    nice python benchmarks/mutation_score.py                 # all mutations
    nice python benchmarks/mutation_score.py -k time_pairs   # names containing a substring
    nice python benchmarks/mutation_score.py --list          # the list, and whether each snippet is found
    nice python benchmarks/mutation_score.py --baseline      # first check the tests pass unmutated
    nice python benchmarks/mutation_score.py --json out.json # also write the results

A snippet that is found in no file (or in more than one) is reported as "not found" (or "ambiguous"), listed
at the end, and makes the script exit 1 (so does `--list`): update its entry when the code it names changes.

Each entry names in `kills` one test (`file::test_name`, without parameters) that kills it without comparing
JAX with PyTorch: a closed form, diffusers, or a quantity computed a second way. A mistake written the same
way in both backends passes every twin test, so a mutation killed only by one (TWIN_TESTS) is not counted as
caught by the suite's own references; `tests/test_benchmarks.py` checks the convention without running mutations.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP_DIRS = {".git", ".venv", "__pycache__", "runs", "results", ".pytest_cache", ".ruff_cache", "node_modules"}


@dataclasses.dataclass(frozen=True)
class Mutation:
    """name; glob of the file(s) to search (relative to the repository root, '*' spans '/'); the exact
    snippet and its replacement (one line); the tests to run (pytest node ids or files, '-k EXPR' allowed
    as a separate item)."""

    name: str
    where: str
    snippet: str
    replacement: str
    tests: tuple[str, ...]
    kills: str = ""  # file::test_name of a non-twin test that kills it (see the module docstring)


M = Mutation
REF = "tests/test_independent_references.py"
IND = "tests/test_independent_checks.py"
TWIN_TESTS = (
    "tests/test_core_parity.py",  # JAX against torch_ref, function by function
    "tests/test_export.py::test_torch_samples_equal_jax_samples",
    "tests/test_twin_copies.py",  # the marked copies agree as text
    "tests/test_twin_signatures.py",
)
"""Tests (files, or file::test) that compare the two backends with each other: no entry's `kills` may be one."""
MUTATIONS = [
    # ---- UNet port (JAX) ----------------------------------------------------------------------------
    M("unet: transformer GroupNorm eps 1e-6 -> 1e-5", "flowmap_jax/*",
      'group_norm(self.norm_num_groups, 1e-6, self.dtype, "norm")',
      'group_norm(self.norm_num_groups, 1e-5, self.dtype, "norm")', ("tests/test_unet_structure.py",),
      kills="tests/test_unet_structure.py::test_every_norm_and_attention_has_diffusers_settings"),
    M("unet: transformer LayerNorm eps 1e-5 -> 1e-6", "flowmap_jax/*",
      "nn.LayerNorm(epsilon=1e-5, use_fast_variance=False", "nn.LayerNorm(epsilon=1e-6, use_fast_variance=False",
      ("tests/test_unet_structure.py",),
      kills="tests/test_unet_structure.py::test_every_norm_and_attention_has_diffusers_settings"),
    M("unet: conv_norm_out ignores norm_eps", "flowmap_jax/*",
      'group_norm(cfg.norm_num_groups, cfg.norm_eps, self.dtype, "conv_norm_out")',
      'group_norm(cfg.norm_num_groups, 1e-5, self.dtype, "conv_norm_out")', ("tests/test_unet_structure.py",),
      kills="tests/test_unet_structure.py::test_every_norm_and_attention_has_diffusers_settings"),
    M("unet: attention scale 1/sqrt(heads)", "flowmap_jax/*",
      "scale=self.dim_head**-0.5", "scale=self.heads**-0.5",
      ("tests/test_unet_structure.py", "tests/test_unet_parity.py::test_forward_matches_diffusers[sd1]"),
      kills="tests/test_unet_structure.py::test_every_norm_and_attention_has_diffusers_settings"),
    M("unet: tanh-approximate GELU in GEGLU", "flowmap_jax/*",
      "jax.nn.gelu(gate, approximate=False)", "jax.nn.gelu(gate, approximate=True)",
      ("tests/test_unet_parity.py", "-k", "forward and (sd1 or diffusers_tiny_2)"),
      kills="tests/test_unet_parity.py::test_forward_matches_diffusers"),
    M("unet: resnet output_scale_factor multiplies", "flowmap_jax/*",
      "out = out / self.output_scale_factor", "out = out * self.output_scale_factor",
      ("tests/test_unet_parity.py", "-k", "forward and misc_a"),
      kills="tests/test_unet_parity.py::test_forward_matches_diffusers"),
    # ---- conversion -----------------------------------------------------------------------------------
    M("conversion: conv kernel transposed (in/out swapped)", "flowmap_jax/*",
      "return np.transpose(array, (2, 3, 1, 0))", "return np.transpose(array, (3, 2, 1, 0))",
      ("tests/test_conversion.py", "-k", "bit_exact or folder_round_trip"),
      kills="tests/test_conversion.py::test_torch_flax_torch_is_bit_exact_and_every_parameter_is_mapped"),
    M("conversion: export reads params for --weights ema", "flowmap_jax/*",
      'name = "ema_params" if weights == "ema" else "params"', 'name = "params" if weights == "ema" else "params"',
      ("tests/test_export.py", "-k", "export_folder or raw_params"),
      kills="tests/test_export.py::test_export_folder"),
    # ---- schedules ------------------------------------------------------------------------------------
    M("schedules (shared formula): DDPM interpolation clipped one step early", "flowmap_jax/spec/schedule/*",
      "index = ops.clip(ops.floor(u), 0, n - 1)", "index = ops.clip(ops.floor(u), 0, n - 2)",
      (REF, "-k", "ddpm"),
      kills=REF + "::test_ddpm_alpha_at_every_integer_is_diffusers_alphas_cumprod"),
    M("schedules (shared): scaled_linear betas not squared", "flowmap_jax/*",
      "np.linspace(self.beta_start ** 0.5, self.beta_end ** 0.5, n, dtype=np.float64) ** 2",
      "np.linspace(self.beta_start, self.beta_end, n, dtype=np.float64)", (REF, "-k", "ddpm"),
      kills=REF + "::test_ddpm_alpha_at_every_integer_is_diffusers_alphas_cumprod"),
    M("schedules (shared formula): cosine offset s enters with the wrong sign", "flowmap_jax/spec/schedule/*",
      "return (t / self.time_scale + s) / (1.0 + s) * (math.pi / 2)",
      "return (t / self.time_scale + s) / (1.0 - s) * (math.pi / 2)",
      ("tests/test_schedules.py", "-k", "closed_forms"),
      kills="tests/test_schedules.py::test_continuous_closed_forms"),
    M("schedules (shared formula): time_from_rho uses rho instead of rho^2", "flowmap_jax/spec/schedule/*",
      "log_alpha = -0.5 * ops.log1p(rho * rho)", "log_alpha = -0.5 * ops.log1p(rho)",
      ("tests/test_schedules.py", "-k", "time_from_rho"),
      kills="tests/test_schedules.py::test_time_from_rho_inverts"),
    # ---- predictions ----------------------------------------------------------------------------------
    M("predictions (JAX): epsilon jump coefficient sign flipped", "flowmap_jax/*",
      "return ratio, sigma_t - sigma_s * ratio", "return ratio, sigma_t + sigma_s * ratio", (REF, "-k", "ddim"),
      kills=REF + "::test_ddim_step_matches_diffusers_ddim_scheduler_step"),
    M("predictions (JAX): v_prediction x0_hat sign", "flowmap_jax/*",
      "return (a * x_t - s * prediction) / norm, (s * x_t + a * prediction) / norm",
      "return (a * x_t + s * prediction) / norm, (s * x_t + a * prediction) / norm", (REF, "-k", "heun"),
      kills=REF + "::test_heun_matches_diffusers_heun_discrete"),
    M("predictions (JAX): v_prediction jump c_pred sign", "flowmap_jax/*",
      "(sigma_t * alpha_s - alpha_t * sigma_s) / norm\n    norm = alpha_s + sigma_s",
      "(alpha_t * sigma_s - sigma_t * alpha_s) / norm\n    norm = alpha_s + sigma_s", (REF, "-k", "ddim"),
      kills=REF + "::test_ddim_step_matches_diffusers_ddim_scheduler_step"),
    M("predictions (JAX): sample jump ratio alpha instead of sigma", "flowmap_jax/*",
      "ratio = sigma_t / sigma_s\n        return ratio, alpha_t - alpha_s * ratio",
      "ratio = alpha_t / alpha_s\n        return ratio, alpha_t - alpha_s * ratio", (REF, "-k", "ddim"),
      kills=REF + "::test_ddim_step_matches_diffusers_ddim_scheduler_step"),
    M("predictions (torch): epsilon jump ratio inverted", "torch_ref/*",
      "ratio = alpha_t / alpha_s\n        return ratio, sigma_t - sigma_s * ratio",
      "ratio = alpha_s / alpha_t\n        return ratio, sigma_t - sigma_s * ratio",
      ("tests/test_samplers.py", "-k", "ddim_matches_diffusers"),
      kills="tests/test_samplers.py::test_ddim_matches_diffusers"),
    # ---- samplers -------------------------------------------------------------------------------------
    M("samplers (JAX): Heun corrector weight 1 instead of 1/2", "flowmap_jax/*",
      "edm = expand_time(0.5 * (s_n - a_n * s_c / a_safe), x) * (eps_2 - eps_1)",
      "edm = expand_time(1.0 * (s_n - a_n * s_c / a_safe), x) * (eps_2 - eps_1)", (REF, "-k", "heun"),
      kills=REF + "::test_heun_matches_diffusers_heun_discrete"),
    M("samplers (JAX): gamma re-noising factor gamma^2", "flowmap_jax/*",
      "x = (a_n / a_u) * x_u + gamma * s_n * z", "x = (a_n / a_u) * x_u + gamma ** 2 * s_n * z",
      (REF, "-k", "gamma"),
      kills=REF + "::test_gamma_renoising_keeps_the_exact_law"),
    M("samplers (JAX): gamma jump target without the square root", "flowmap_jax/*",
      "jnp.sqrt(1.0 - gamma ** 2) * s_n / a_n", "(1.0 - gamma ** 2) * s_n / a_n", (REF, "-k", "gamma"),
      kills=REF + "::test_gamma_renoising_keeps_the_exact_law"),
    M("samplers (JAX): DPM-Solver++(2M) second-order term doubled", "flowmap_jax/*",
      "second = first + expand_time(0.5 * a_n_safe * (1.0 - exp_neg_h), x_cur) * d_1",
      "second = first + expand_time(1.0 * a_n_safe * (1.0 - exp_neg_h), x_cur) * d_1",
      ("tests/test_samplers.py", "-k", "converge_at_their_order"),
      kills="tests/test_samplers.py::test_teacher_solvers_converge_at_their_order"),
    M("samplers (torch): gamma re-noising factor gamma^2", "torch_ref/*",
      "x = (a_n / a_u) * x_u + gamma * s_n * z", "x = (a_n / a_u) * x_u + gamma ** 2 * s_n * z",
      (IND, "-k", "torch_gamma"),
      kills=IND + "::test_torch_gamma_renoising_keeps_the_exact_law"),
    M("samplers (torch): Heun corrector weight 1 instead of 1/2", "torch_ref/*",
      "edm = expand_time(0.5 * (s_n - a_n * s_c / a_safe), x) * (eps_2 - eps_1)",
      "edm = expand_time(1.0 * (s_n - a_n * s_c / a_safe), x) * (eps_2 - eps_1)",
      (IND, "-k", "torch_heun"),
      kills=IND + "::test_torch_heun_converges_at_second_order_to_the_exact_flow"),
    # ---- objectives -----------------------------------------------------------------------------------
    M("objectives (shared): lagrangian's default residual_form swapped (direct -> stopgrad)",
      "flowmap_jax/spec/objective_options.py",
      'residual_form: str = "direct"', 'residual_form: str = "stopgrad"',
      ("tests/test_objectives.py", "-k", "reduces_one_jump_error and (lagrangian or eulerian)"),
      kills="tests/test_objectives.py::test_objective_reduces_one_jump_error"),
    # ---- the flow map's parameterisation ----------------------------------------------------------------
    M("flow map (JAX): angle jump coefficient sign", "flowmap_jax/*",
      "return jnp.cos(delta), -jnp.sin(delta)", "return jnp.cos(delta), jnp.sin(delta)",
      ("tests/test_flow_map_parameterization.py",),
      kills="tests/test_flow_map_parameterization.py::test_coefficients_match_the_closed_form_and_stay_bounded"),
    M("flow map (torch): linear jump length halved", "torch_ref/*",
      "d_tau = (torch.as_tensor(t_target", "d_tau = 0.5 * (torch.as_tensor(t_target",
      ("tests/test_flow_map_parameterization.py",),
      kills="tests/test_flow_map_parameterization.py::test_coefficients_match_the_closed_form_and_stay_bounded"),
    M("flow map (JAX): teacher blend weights swapped", "flowmap_jax/*",
      "return tuple((1.0 - weight) * a + weight * b for", "return tuple(weight * a + (1.0 - weight) * b for",
      ("tests/test_flow_map_parameterization.py", "-k", "blend"),
      kills="tests/test_flow_map_parameterization.py::test_teacher_blend_interpolates_the_coefficients"),
    M("flow map (JAX): JVP drops the coefficients' derivative", "flowmap_jax/*",
      "d_map = (expand_time(dc_x, x_s) * x_s + expand_time(c_x, x_s) * dx + expand_time(dc_f, x_s) * out",
      "d_map = (expand_time(c_x, x_s) * dx + expand_time(dc_f, x_s) * out",
      ("tests/test_objectives.py", "-k", "reduces_one_jump_error and lagrangian"),
      kills="tests/test_objectives.py::test_objective_reduces_one_jump_error"),
    M("objectives (JAX): jump weight not clipped at 1", "flowmap_jax/*",
      "return _sg(1.0 / jnp.maximum(jnp.abs(c_x), 1.0))", "return _sg(1.0 / jnp.abs(c_x))",
      ("tests/test_objectives.py", "tests/test_core_parity.py", "-k",
       "reduces_one_jump_error or objective_loss_and_gradient"),
      kills="tests/test_objectives.py::test_objective_reduces_one_jump_error"),
    # ---- time pairs -----------------------------------------------------------------------------------
    M("time_pairs (JAX): clean-end draw reuses the source key", "flowmap_jax/*",
      "jax.random.uniform(k_clean, (batch_size,)) < config.p_clean",
      "jax.random.uniform(k_src, (batch_size,)) < config.p_clean", ("tests/test_guards.py", "-k", "time_pairs"),
      kills="tests/test_guards.py::test_time_pairs_clean_target_is_independent_of_the_source"),
    M("time_pairs (JAX): jump length U^p instead of U^(1/p)", "flowmap_jax/*",
      "jax.random.uniform(k_len, (batch_size,)) ** (1.0 / config.length_power)",
      "jax.random.uniform(k_len, (batch_size,)) ** config.length_power",
      ("tests/test_guards.py", "tests/test_objectives.py", "-k", "time_pairs"),
      kills="tests/test_guards.py::test_time_pairs_clean_target_is_independent_of_the_source"),
    M("time_pairs (torch): jump length U^p instead of U^(1/p)", "torch_ref/*",
      "d = torch.rand(batch_size, generator=rng) ** (1.0 / config.length_power)",
      "d = torch.rand(batch_size, generator=rng) ** config.length_power",
      ("tests/test_objectives.py", "-k", "time_pairs"),
      kills="tests/test_objectives.py::test_time_pairs_distribution_both_backends"),
    # ---- checkpointing --------------------------------------------------------------------------------
    M("checkpointing: fingerprint compared with itself", "flowmap_jax/*",
      "bad = mismatched_leaves(saved, actual)",
      "bad = mismatched_leaves(actual, actual)",
      ("tests/test_guards.py", "-k", "fingerprint"),
      kills="tests/test_guards.py::test_valid_but_altered_arrays_are_caught_by_the_fingerprint_alone"),
    M("checkpointing: keeps one checkpoint too many", "flowmap_jax/*",
      "max_to_keep=keep,", "max_to_keep=keep + 1,", ("tests/test_guards.py", "-k", "retention"),
      kills="tests/test_guards.py::test_retention_keeps_the_newest"),
    M("checkpointing: --run.resume of a step folder resumes the newest", "flowmap_jax/*",
      "return os.path.dirname(path), int(base)", "return os.path.dirname(path), None",
      ("tests/test_guards.py", "-k", "resume"),
      kills="tests/test_guards.py::test_keep_checkpoints_and_resume_from_a_given_step_of_another_run"),
    # ---- export ---------------------------------------------------------------------------------------
    M("export: fingerprint check of exported weights always passes", "flowmap_jax/*",
      "and (saved[3] is None or _close(saved[3], weighted, scale)))", "and True) or True",
      ("tests/test_export.py", "-k", "corrupted_newest"),
      kills="tests/test_export.py::test_corrupted_newest_checkpoint_falls_back"),
    # ---- issue 29: checks that see what only the twin saw ----------------------------------------------
    M("objectives (JAX): progressive target not stop-gradiented", "flowmap_jax/*",
      "target = _sg(fmap(params, x_u, u, t, cond))", "target = fmap(params, x_u, u, t, cond)",
      (IND, "-k", "progressive_target"), kills=IND + "::test_progressive_target_is_a_constant_for_the_gradient_jax"),
    M("objectives (torch): progressive target not detached", "torch_ref/*",
      "target = fmap(params, x_u, u, t, cond).detach()", "target = fmap(params, x_u, u, t, cond)",
      (IND, "-k", "progressive_target"),
      kills=IND + "::test_progressive_target_is_a_constant_for_the_gradient_torch"),
    M("objectives (JAX): pairs target solved in one step, not teacher_steps", "flowmap_jax/*",
      'p["s"], p["t"], options.teacher_steps,', 'p["s"], p["t"], 1,',
      (IND, "-k", "pairs_objective_target"),
      kills=IND + "::test_pairs_objective_target_is_the_configured_solve_and_near_the_exact_flow_jax"),
    M("objectives (torch): pairs target solved in one step, not teacher_steps", "torch_ref/*",
      'p["s"], p["t"], options.teacher_steps,', 'p["s"], p["t"], 1,',
      (IND, "-k", "pairs_objective_target"),
      kills=IND + "::test_pairs_objective_target_is_the_configured_solve_and_near_the_exact_flow_torch"),
    M("objectives (JAX): eulerian tangent along -v", "flowmap_jax/*",
      'p["student_cond"], (v, ds, None),', 'p["student_cond"], (-v, ds, None),',
      (IND, "-k", "eulerian_residual"), kills=IND + "::test_eulerian_residual_is_the_derivative_along_the_flow_jax"),
    M("objectives (torch): eulerian tangent along -v", "torch_ref/*",
      'p["student_cond"], (v, ds, None),', 'p["student_cond"], (-v, ds, None),',
      (IND, "-k", "eulerian_residual"),
      kills=IND + "::test_eulerian_residual_is_the_derivative_along_the_flow_torch"),
    M("flow map (JAX): guidance input embeds w, not w - 1", "flowmap_jax/*",
      "timestep_cond=guidance_scale_embedding(w - 1.0, embedding_dim)",
      "timestep_cond=guidance_scale_embedding(w, embedding_dim)",
      (IND, "-k", "feeds_diffusers_embedding"),
      kills=IND + "::test_jax_sampling_at_w_feeds_diffusers_embedding_of_w_minus_1"),
    M("flow map (torch): guidance input embeds w, not w - 1", "torch_ref/*",
      "timestep_cond=guidance_scale_embedding(w - 1.0, embedding_dim)",
      "timestep_cond=guidance_scale_embedding(w, embedding_dim)",
      (IND, "-k", "feeds_diffusers_embedding"),
      kills=IND + "::test_torch_sampling_at_w_feeds_diffusers_embedding_of_w_minus_1"),
    M("schedules (JAX): dtheta_dt with the wrong sign on sigma alpha'", "flowmap_jax/*",
      "return (alpha * d_sigma - sigma * d_alpha) / (alpha * alpha + sigma * sigma)",
      "return (alpha * d_sigma + sigma * d_alpha) / (alpha * alpha + sigma * sigma)",
      (IND, "-k", "dtheta_dt"), kills=IND + "::test_dtheta_dt_is_the_derivative_of_the_angle_both_backends"),
    M("schedules (torch): dtheta_dt with the wrong sign on sigma alpha'", "torch_ref/*",
      "return (alpha * d_sigma - sigma * d_alpha) / (alpha * alpha + sigma * sigma)",
      "return (alpha * d_sigma + sigma * d_alpha) / (alpha * alpha + sigma * sigma)",
      (IND, "-k", "dtheta_dt"), kills=IND + "::test_dtheta_dt_is_the_derivative_of_the_angle_both_backends"),
    M("time_pairs (torch): bidirectional swaps a quarter", "torch_ref/*",
      "swap = torch.rand(batch_size, generator=rng) < 0.5", "swap = torch.rand(batch_size, generator=rng) < 0.25",
      (IND, "-k", "swaps_half"), kills=IND + "::test_torch_time_pairs_bidirectional_swaps_half"),
    M("run config: model.dtype may change on resume", "flowmap_jax/training/run_config_check.py",
      '"model.remat",  # memory only', '"model.remat", "model.dtype",  # memory only',
      (IND, "-k", "may_change"), kills=IND + "::test_may_change_is_exactly_the_listed_fields_each_with_a_reason"),
    M("run config: objective options not compared on resume", "flowmap_jax/training/run_config_check.py",
      "        if key in MAY_CHANGE:", "        if key in MAY_CHANGE or key.startswith(OPTIONS_PREFIX):",
      (IND, "-k", "objective_option_exits_2"), kills=IND + "::test_resume_that_changes_an_objective_option_exits_2"),
    M("export: fingerprint compares only the sum of squares", "flowmap_jax/*",
      "return (_close(saved[1], total, scale) and _close(saved[2], sumsq, 0.0)\n"
      "            and (saved[3] is None or _close(saved[3], weighted, scale)))",
      "return _close(saved[2], sumsq, 0.0)",
      (IND, "-k", "keep_one_of_the_sums"), kills=IND + "::test_export_reader_refuses_arrays_that_keep_one_of_the_sums"),
    M("export: fingerprint ignores the sum of squares", "flowmap_jax/*",
      "return (_close(saved[1], total, scale) and _close(saved[2], sumsq, 0.0)\n",
      "return (_close(saved[1], total, scale) and True\n",
      (IND, "-k", "keep_one_of_the_sums"), kills=IND + "::test_export_reader_refuses_arrays_that_keep_one_of_the_sums"),
]


def _source_files(root: str):
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        rel_dir = os.path.relpath(dirpath, root)
        if rel_dir.split(os.sep)[0] in ("tests", "benchmarks"):
            continue
        for name in sorted(filenames):
            if name.endswith(".py"):
                yield os.path.normpath(os.path.join(rel_dir, name))


def locate(mutation: Mutation, root: str = ROOT) -> tuple[str | None, str]:
    """(relative path, '') of the one file holding the snippet exactly once, or (None, reason)."""
    hits = []
    for rel in _source_files(root):
        if not fnmatch.fnmatch(rel, mutation.where):
            continue
        with open(os.path.join(root, rel), encoding="utf-8") as f:
            count = f.read().count(mutation.snippet)
        if count:
            hits.append((rel, count))
    if not hits:
        return None, "not found"
    if len(hits) > 1 or hits[0][1] > 1:
        return None, "ambiguous: " + ", ".join(f"{p} ({c}x)" for p, c in hits)
    return hits[0][0], ""


def _copy_repo(dest: str) -> None:
    def ignore(directory, names):
        return [n for n in names if n in SKIP_DIRS or n.endswith((".pyc", ".png"))]
    shutil.copytree(ROOT, dest, ignore=ignore, dirs_exist_ok=True)


def _pytest_args(tests: tuple[str, ...]) -> list[str]:
    """Node ids / files, with "-k", EXPR pairs passed through."""
    return list(tests)


def run_tests(copy: str, tests: tuple[str, ...], timeout: int) -> tuple[list[str], int, float, str]:
    """(failed test ids, number of tests run, seconds, note) of `tests` in the copy."""
    report = os.path.join(copy, ".mutation_report.xml")
    if os.path.exists(report):
        os.remove(report)
    env = dict(os.environ, PYTHONPATH=copy, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-n", "0", "-m", "not slow",
           f"--junitxml={report}", *_pytest_args(tests)]
    start = time.time()
    try:
        done = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return ["(timeout)"], 0, time.time() - start, f"timed out after {timeout}s"
    seconds = time.time() - start
    if not os.path.exists(report):
        return ["(pytest did not run)"], 0, seconds, done.stderr[-300:] + done.stdout[-300:]
    failed, total = [], 0
    for case in ET.parse(report).getroot().iter("testcase"):
        total += 1
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(f"{case.get('classname', '').split('.')[-1]}::{case.get('name')}")
    if done.returncode not in (0, 1) and not failed:  # collection error, crash
        failed.append(f"(pytest exit {done.returncode})")
    return failed, total, seconds, ""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-k", default=None, help="only mutations whose name contains this substring")
    parser.add_argument("--list", action="store_true", help="list the mutations and where each snippet is")
    parser.add_argument("--baseline", action="store_true", help="run every mutation's tests unmutated first")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per mutation's test run")
    parser.add_argument("--json", default=None, help="write the results to this file")
    args = parser.parse_args(argv)
    mutations = [m for m in MUTATIONS if args.k is None or args.k in m.name]
    if args.list:
        missing = []
        for m in mutations:
            path, reason = locate(m)
            print(f"{m.name:62s} {path or reason}")
            if path is None:
                missing.append(f"{m.name}: {reason}")
        print(f"{len(mutations)} mutations")
        return _report_missing(missing)
    results = []
    with tempfile.TemporaryDirectory(prefix="mutation_score_") as scratch:
        copy = os.path.join(scratch, "repo")
        _copy_repo(copy)
        if args.baseline:
            for tests in dict.fromkeys(m.tests for m in mutations):
                failed, total, seconds, note = run_tests(copy, tests, args.timeout)
                print(f"baseline {' '.join(tests)}: {total} tests, {len(failed)} failed {failed} ({seconds:.0f}s) {note}",
                      flush=True)
                if failed:
                    print("error: the tests fail without a mutation; fix them first", file=sys.stderr)
                    return 1
        for m in mutations:
            path, reason = locate(m, copy)
            if path is None:
                results.append({"name": m.name, "file": reason, "killed": False, "killed_by": [], "tests": 0,
                                "seconds": 0.0, "missing": True})
                print(f"{m.name}: {reason}", flush=True)
                continue
            full = os.path.join(copy, path)
            with open(full, encoding="utf-8") as f:
                original = f.read()
            try:
                with open(full, "w", encoding="utf-8") as f:
                    f.write(original.replace(m.snippet, m.replacement, 1))
                failed, total, seconds, note = run_tests(copy, m.tests, args.timeout)
            finally:
                with open(full, "w", encoding="utf-8") as f:
                    f.write(original)
            broken = failed[:1] == ["(pytest did not run)"]  # no verdict: an error of the set-up, not a kill
            results.append({"name": m.name, "file": path, "killed": bool(failed) and not broken, "killed_by": failed,
                            "tests": total, "seconds": round(seconds, 1), "note": note, "missing": broken})
            print(f"{m.name}: {'KILLED by ' + ', '.join(failed) if results[-1]['killed'] else 'SURVIVED'} "
                  f"({total} tests, {seconds:.0f}s)", flush=True)
    killed = sum(r["killed"] for r in results)
    print()
    print("| mutation | file | killed by (first failing test; pytest -x) |")
    print("|---|---|---|")
    for r in results:
        print(f"| {r['name']} | {r['file']} | {', '.join(r['killed_by']) if r['killed'] else '**survived**'} |")
    print(f"\nscore: {killed} / {len(results)} killed ({100.0 * killed / max(1, len(results)):.0f}%)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"killed": killed, "total": len(results), "results": results}, f, indent=2)
    return _report_missing([f"{r['name']}: {r['file']}" for r in results if r.get("missing")])


def _report_missing(missing: list[str]) -> int:
    """1 (and the list on stderr) when a snippet was not found exactly once (or pytest did not run), else 0."""
    if not missing:
        return 0
    print(f"error: {len(missing)} mutation(s) not run: snippet not found exactly once (update the entry) or "
          "pytest did not run:",
          file=sys.stderr)
    for line in missing:
        print(f"  {line}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
