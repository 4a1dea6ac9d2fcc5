"""Each objective owns its options (`spec.objective_options`): the registry agrees with both backends and the
command line, each class holds its objective's defaults, a run's flat settings resolve per objective as the
code before the per-objective classes did (an old config.json loads, resolves the same and resumes), and a
flat key that none of the run's objectives has is an error. Pure Python except the backend checks.
"""

import dataclasses
import json
import re
import typing

import pytest

from flowmap_jax.training import presets, run_config_check, train_cli
from flowmap_jax.training.config import ConfigError, ObjectiveName, TrainConfig
from flowmap_jax.spec import objective_options as oo

# `objective` sections of config.json as the code before the per-objective classes wrote them (one flat
# ObjectiveOptions for all objectives), with what its `residual_form_for`, `tangent_normalization_for` and
# `output_scale_power_for` returned per objective. Written by (then) `presets.parse_args(ARGV).to_dict()["objective"]`:
# the digits preset; `--objective.names eulerian,pairs --objective.options '{"teacher_steps": 8,
# "output_scale_power": 2, "residual_form": "direct", "guidance_scale_range": [1, 3], "guidance_embedding_dim":
# 256, "time_pairs": {"p_noise": 0.1}}'`; `--objective.names lagrangian,progressive --objective.options
# '{"tangent_normalization": true, "jvp": "finite_difference", "progressive_anchor_weight": 0.5,
# "adaptive_weight": true}'`.
OLD_SECTIONS = [
    ('{"names": ["pairs"], "weights": [1.0], "options": {"time_pairs": {"length_power": 1.0, "p_clean": 0.25, '
     '"p_noise": 0.0, "bidirectional": false}, "teacher_steps": 4, "teacher_solver": "dpmpp_2m", "teacher_spacing": '
     '"logsnr", "residual_form": "auto", "tangent_normalization": null, "tangent_norm_c": 0.1, '
     '"tangent_warmup_steps": 0, "tangent_warmup_max": 1.0, "adaptive_weight": false, "adaptive_weight_p": 1.0, '
     '"adaptive_weight_c": 0.01, "jvp": "exact", "fd_eps": 0.005, "jump_scale_normalization": true, '
     '"output_scale_power": null, "output_scale_floor": 0.05, "progressive_anchor_weight": 1.0, '
     '"head_warmup_steps": 0, "guidance_scale_range": null, "guidance_embedding_dim": null}}',
     {"pairs": ["direct", False, 0.0], "lagrangian": ["direct", False, 0.0], "eulerian": ["stopgrad", True, 2.0],
      "progressive": ["direct", False, 0.0]}),
    ('{"names": ["eulerian", "pairs"], "weights": [1.0, 0.5], "options": {"time_pairs": {"length_power": 1.0, '
     '"p_clean": 0.25, "p_noise": 0.1, "bidirectional": false}, "teacher_steps": 8, "teacher_solver": "dpmpp_2m", '
     '"teacher_spacing": "logsnr", "residual_form": "direct", "tangent_normalization": null, "tangent_norm_c": 0.1, '
     '"tangent_warmup_steps": 0, "tangent_warmup_max": 1.0, "adaptive_weight": false, "adaptive_weight_p": 1.0, '
     '"adaptive_weight_c": 0.01, "jvp": "exact", "fd_eps": 0.005, "jump_scale_normalization": true, '
     '"output_scale_power": 2, "output_scale_floor": 0.05, "progressive_anchor_weight": 1.0, "head_warmup_steps": '
     '0, "guidance_scale_range": [1.0, 3.0], "guidance_embedding_dim": 256}}',
     {"pairs": ["direct", False, 2.0], "lagrangian": ["direct", False, 2.0], "eulerian": ["direct", True, 2.0],
      "progressive": ["direct", False, 2.0]}),
    ('{"names": ["lagrangian", "progressive"], "weights": [1.0, 1.0], "options": {"time_pairs": {"length_power": '
     '1.0, "p_clean": 0.25, "p_noise": 0.0, "bidirectional": false}, "teacher_steps": 4, "teacher_solver": '
     '"dpmpp_2m", "teacher_spacing": "logsnr", "residual_form": "auto", "tangent_normalization": true, '
     '"tangent_norm_c": 0.1, "tangent_warmup_steps": 0, "tangent_warmup_max": 1.0, "adaptive_weight": true, '
     '"adaptive_weight_p": 1.0, "adaptive_weight_c": 0.01, "jvp": "finite_difference", "fd_eps": 0.005, '
     '"jump_scale_normalization": true, "output_scale_power": null, "output_scale_floor": 0.05, '
     '"progressive_anchor_weight": 0.5, "head_warmup_steps": 0, "guidance_scale_range": null, '
     '"guidance_embedding_dim": null}}',
     {"pairs": ["direct", True, 0.0], "lagrangian": ["direct", True, 0.0], "eulerian": ["stopgrad", True, 2.0],
      "progressive": ["direct", True, 0.0]}),
]
RESOLVED_BY = ("residual_form", "tangent_normalization", "output_scale_power")


def _old_config(section: dict) -> TrainConfig:
    data = presets.digits().to_dict()
    data["objective"] = section
    return TrainConfig.from_dict(json.loads(json.dumps(data)))


@pytest.mark.parametrize("section, resolved", OLD_SECTIONS, ids=["digits", "eulerian-pairs", "lagrangian-progressive"])
def test_an_old_config_json_resolves_every_option_as_before(section, resolved):
    """Every field of each objective's options equals the flat value the old code read (the three that were
    resolved by name equal what `*_for(name)` returned), for every objective, selected or not."""
    section = json.loads(section)
    options = _old_config(section).objective.options
    flat = section["options"]
    for name, old_values in resolved.items():
        own = options.for_objective(name)
        assert type(own) is oo.OBJECTIVE_OPTIONS[name]
        for field in dataclasses.fields(own):
            value = getattr(own, field.name)
            if field.name in RESOLVED_BY:
                assert value == old_values[RESOLVED_BY.index(field.name)], (name, field.name)
            elif field.name == "time_pairs":
                assert dataclasses.asdict(value) == flat["time_pairs"]
            elif field.name == "guidance_scale_range":
                assert value == (None if flat[field.name] is None else tuple(flat[field.name]))
            elif field.name not in flat:  # an option added since (path_targets): its default
                assert field.name in ("path_targets",) and value == field.default, (name, field.name)
            else:
                assert value == flat[field.name], (name, field.name)


@pytest.mark.parametrize("section, _", OLD_SECTIONS, ids=["digits", "eulerian-pairs", "lagrangian-progressive"])
def test_an_old_config_json_resumes_without_a_change(section, _, tmp_path):
    """A run folder whose config.json the old code wrote resumes with the same flags (no ConfigChanged), and a
    real change of an option is still named."""
    section = json.loads(section)
    data = presets.digits().to_dict()
    data["objective"] = section
    (tmp_path / run_config_check.CONFIG_NAME).write_text(json.dumps(data, indent=2))
    config = _old_config(section)
    assert run_config_check.check_resume(str(tmp_path), config.to_dict(), allow_change=False) == {}
    config.objective.options = config.objective.options.updated({"output_scale_floor": 0.5})
    with pytest.raises(run_config_check.ConfigChanged, match=r"objective\.options\.output_scale_floor 0\.05 -> 0\.5"):
        run_config_check.check_resume(str(tmp_path), config.to_dict(), allow_change=False)


def test_each_objective_registers_its_options_class_with_its_defaults():
    assert oo.objective_names() == tuple(oo.OBJECTIVE_OPTIONS)
    assert set(typing.get_args(ObjectiveName)) == set(oo.OBJECTIVE_OPTIONS)
    eulerian, lagrangian = oo.objective_options("eulerian"), oo.objective_options("lagrangian")
    assert (eulerian.residual_form, eulerian.tangent_normalization, eulerian.output_scale_power) == ("stopgrad", True, 2)
    assert (lagrangian.residual_form, lagrangian.tangent_normalization, lagrangian.output_scale_power) == \
        ("direct", False, 0)
    assert oo.objective_options("pairs").teacher_steps == 32
    assert oo.objective_options("progressive").progressive_anchor_weight == 1.0
    for name, cls in oo.OBJECTIVE_OPTIONS.items():
        assert issubclass(cls, oo.SharedOptions)
        assert oo.objective_options(name) == cls() == oo.ObjectiveOptions().for_objective(name)


def test_objective_options_accepts_none_a_dict_settings_or_its_own_class():
    own = oo.EulerianOptions(output_scale_power=1)
    assert oo.objective_options("eulerian", own) is own and own.output_scale_power == 1.0
    # A dict is a flat settings object: keys the objective lacks are ignored, unknown keys raise.
    assert oo.objective_options("eulerian", {"teacher_steps": 4, "jvp": "finite_difference"}) == \
        oo.EulerianOptions(jvp="finite_difference")
    assert oo.objective_options("pairs", oo.ObjectiveOptions(teacher_steps=4)).teacher_steps == 4
    with pytest.raises(ValueError, match=r"unknown objective option\(s\) \['teacher_step'\]"):
        oo.objective_options("pairs", {"teacher_step": 4})
    with pytest.raises(ValueError, match=re.escape(f"unknown objective 'consistency': expected one of "
                                                   f"{oo.objective_names()}")):
        oo.objective_options("consistency")
    with pytest.raises(TypeError, match="objective 'lagrangian' takes JvpOptions .* got EulerianOptions"):
        oo.objective_options("lagrangian", oo.EulerianOptions())
    with pytest.raises(ValueError, match="unknown residual_form 'auto'"):
        oo.JvpOptions(residual_form="auto")  # "auto" is only an old spelling of a run's unset setting


def test_flat_options_set_every_named_objective_that_has_them():
    """`--objective.options` sets each key on every named objective whose class has it; a key that none of
    them has is a one-line ConfigError naming the key, the run's objectives and those that have it."""
    config = train_cli.parse_args(["--objective.names", "eulerian,lagrangian", "--objective.weights", "1,1",
                                 "--objective.options", '{"output_scale_power": 1, "jvp": "finite_difference"}'])
    for name in ("eulerian", "lagrangian"):
        own = config.objective.options.for_objective(name)
        assert (own.output_scale_power, own.jvp) == (1.0, "finite_difference")
    assert config.objective.options.for_objective("eulerian").residual_form == "stopgrad"
    assert config.objective.options.for_objective("lagrangian").residual_form == "direct"
    with pytest.raises(ConfigError) as error:
        train_cli.parse_args(["--objective.names", "eulerian", "--objective.options", '{"teacher_steps": 8}'])
    message = str(error.value)
    assert "\n" not in message and message.startswith("--objective.options: ")
    assert all(word in message for word in ("teacher_steps", "eulerian", "pairs")), message
    # The preset's own settings (digits: teacher_steps 4) do not count: only the keys of the flag.
    assert train_cli.parse_args(["--objective.names", "eulerian"]).objective.options.teacher_steps == 4


def test_old_spellings_of_an_unset_option_read_as_unset():
    settings = oo.ObjectiveOptions.from_json('{"residual_form": "auto", "tangent_normalization": null, '
                                             '"output_scale_power": null}')
    assert settings == oo.ObjectiveOptions() and settings.to_json() == "{}"


def test_both_backends_register_exactly_the_spec_objectives():
    from flowmap_jax.core import objectives as jo
    from torch_ref import objectives as to

    assert tuple(jo.OBJECTIVES) == tuple(to.OBJECTIVES) == oo.objective_names()
    *kept, dropped = oo.objective_names()
    with pytest.raises(RuntimeError, match=re.escape(f"missing {[dropped]}, without options class ['consistency']")):
        oo.check_objective_names(kept + ["consistency"], "a backend")
    oo.check_objective_names(list(oo.objective_names()), "a backend")
    for module in (jo, to):
        with pytest.raises(ValueError, match=re.escape(f"unknown objective 'consistency': expected one of "
                                                       f"{oo.objective_names()}")):
            module.make_objective("consistency", None)
