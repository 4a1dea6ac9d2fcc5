"""Each objective's options (`objectives.py` in each backend): one frozen dataclass per objective, with its own
fields and defaults, the registry `OBJECTIVE_OPTIONS` (objective name -> options class), and `ObjectiveOptions`,
a run's settings of all of them (the typed `--objective.options`). Pure Python.

    options = objective_options("eulerian", {"output_scale_power": 1})   # EulerianOptions(..., output_scale_power=1.0)
    settings = ObjectiveOptions.from_json('{"teacher_steps": 8}')        # a run's flat settings
    settings.for_objective("pairs").teacher_steps                        # 8

Adding an objective: its options class here (a subclass of `SharedOptions`, or `SharedOptions` itself when it
has no options of its own) and its entry in `OBJECTIVE_OPTIONS`; then its loss function, registered under the
same name, in `flowmap_jax/core/objectives.py` and `torch_ref/objectives.py` (each checks at import that its names
are these). The command line's choices, `ObjectiveOptions`' fields and the registry-driven tests follow.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing

from flowmap_jax.spec.time_pairs import TimePairConfig

TEACHER_SOLVERS = ("ddim", "heun", "dpmpp_2m")
TEACHER_SPACINGS = ("uniform", "karras", "logsnr")
"""Grids of the teacher's reference solutions (`samplers.solve_grid`)."""

RESIDUAL_FORMS = ("stopgrad", "direct")
JVP_METHODS = ("exact", "finite_difference")


@dataclasses.dataclass(frozen=True)
class SharedOptions:
    """The options every objective has (the options class of an objective without options of its own).

    time_pairs: `TimePairConfig` (or a dict of its fields).
    adaptive_weight, adaptive_weight_p, adaptive_weight_c: per-example loss l <- l / sg((l + c)^p)
        (MeanFlow; l is the per-example mean squared error).
    output_scale_power, output_scale_floor: each example's squared error in X (pairs, progressive) or residual
        (lagrangian, eulerian) is divided by sg(max(|c_F(s, t)|, output_scale_floor))^output_scale_power, c_F
        the map's own coefficient of its output F (X = c_x x_s + c_F F; `FlowMap.own_coefficients`:
        -sin(theta_s - theta_t) for "angle", tau_t - tau_s for "linear"). p = 0 (the default, but eulerian's 2):
        the error in X, where a jump of angle d weighs its output's error by sin(d)^2, so short jumps barely
        train; p = 2: the error in the output's own units (MeanFlow's average-velocity loss), every jump length
        alike; the floor keeps jumps of (almost) zero length finite. Why eulerian needs it: `EulerianOptions`.
        pairs (200 samples, MSE to the teacher's 100-step solution at 1 / 2 / 4 / 8 jumps): p = 0 0.028 /
        0.019 / 0.021 / 0.043, p = 1 0.029 / 0.018 / 0.017 / 0.026, p = 2 0.032 / 0.017 / 0.013 / 0.016
        (1-jump Frechet distance 44 / 48 / 60; docs/DESIGN.md, "Objectives"): it moves fidelity from the one
        long jump to the many short ones, so pairs keeps p = 0.
    head_warmup_steps: the student's coefficients are blended with the teacher's DDIM step, weight
        max(0, 1 - step / head_warmup_steps), so training starts from the teacher's DDIM sampler while the
        network's head converts from the teacher's prediction type to the map's own (`flow_map`, "Head
        mismatch"); 0 = off. Needs batch["step"].
    guidance_scale_range: (lo, hi) to draw a per-example guidance scale w ~ U(lo, hi) for the teacher (guidance
        distillation); None uses the teacher's own scale. lo <= hi. guidance_embedding_dim (>= 4): if set, the
        student gets cond["timestep_cond"] = guidance_scale_embedding(w - 1, dim) (LCM's convention, through the
        UNet's time_cond_proj_dim). The trainer needs both or neither (`config.validate`): it then adds
        time_cond_proj_dim to the student's UNet (`flow_map.add_guidance_input`).
    """

    time_pairs: TimePairConfig = TimePairConfig()
    adaptive_weight: bool = False
    adaptive_weight_p: float = 1.0
    adaptive_weight_c: float = 0.01
    output_scale_power: float = 0.0
    output_scale_floor: float = 0.05
    head_warmup_steps: int = 0
    guidance_scale_range: tuple[float, float] | None = None
    guidance_embedding_dim: int | None = None

    def __post_init__(self):
        if isinstance(self.time_pairs, dict):
            _check_time_pair_keys(self.time_pairs)
            object.__setattr__(self, "time_pairs", TimePairConfig(**self.time_pairs))
        if self.guidance_scale_range is not None:
            object.__setattr__(self, "guidance_scale_range", tuple(float(v) for v in self.guidance_scale_range))
            if len(self.guidance_scale_range) != 2:
                raise ValueError(f"guidance_scale_range must be (lo, hi), got {self.guidance_scale_range}")
            lo, hi = self.guidance_scale_range
            if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
                raise ValueError(f"guidance_scale_range must be (lo, hi) with lo <= hi, got [{lo}, {hi}]")
        if self.guidance_embedding_dim is not None:
            if isinstance(self.guidance_embedding_dim, bool) or int(self.guidance_embedding_dim) != \
                    self.guidance_embedding_dim or self.guidance_embedding_dim < 4:
                raise ValueError(f"guidance_embedding_dim must be an integer >= 4 (the embedding divides by "
                                 f"dim // 2 - 1), got {self.guidance_embedding_dim!r}")
            object.__setattr__(self, "guidance_embedding_dim", int(self.guidance_embedding_dim))
        if int(self.head_warmup_steps) < 0:
            raise ValueError(f"head_warmup_steps must be >= 0, got {self.head_warmup_steps}")
        if isinstance(self.output_scale_power, bool) or not 0 <= self.output_scale_power <= 4:
            raise ValueError(f"output_scale_power must lie in [0, 4], got {self.output_scale_power!r}")
        object.__setattr__(self, "output_scale_power", float(self.output_scale_power))
        if not 0 < self.output_scale_floor <= 1:
            raise ValueError(f"output_scale_floor must lie in (0, 1], got {self.output_scale_floor}")


@dataclasses.dataclass(frozen=True)
class PairsOptions(SharedOptions):
    """`pairs`: the target is the teacher's PF-ODE solved from s to t with `teacher_steps` steps of
    `teacher_solver` (one of TEACHER_SOLVERS) on the `teacher_spacing` grid (one of TEACHER_SPACINGS;
    `samplers.teacher_solve` / `solve_grid`). Measured on elementwise Gaussian-mixture data with modes of
    variance 0.01 against a converged solution, over training pairs that include both ends
    (`python benchmarks/teacher_target_error.py`): the default DPM-Solver++(2M), 32 steps, log-SNR grid leaves
    0.2-0.64% relative RMS error depending on the schedule (DDPM linear / scaled_linear / squaredcos, VP cosine,
    rectified flow); 24 steps 0.3-0.9%, 16 steps 0.6-1.4%, 8 steps 3-6%, 4 steps 10-22%.
    path_targets: J extra targets per pair, each an interior point of the same teacher solution (a grid time
    u_k strictly between s and t, uniform over the teacher_steps - 1 of them), so each pair also trains X(x_s,
    s, u_k) for the price of J student passes and no teacher pass; the loss is the mean over the 1 + J
    targets. Needs teacher_steps >= 2. Not the default: on the digits teacher (600 steps, 8-step targets,
    p = 2; benchmarks/results/more_jumps) J = 2 cost 1.3x per step and at equal steps lost at 1 / 2 / 4 jumps
    (MSE 0.0146 / 0.0100 / 0.0073 against 0.0114 / 0.0084 / 0.0066) for a little at 8 / 16 (0.0066 / 0.0069
    against 0.0070 / 0.0084).
    """

    teacher_steps: int = 32
    teacher_solver: str = "dpmpp_2m"
    teacher_spacing: str = "logsnr"
    path_targets: int = 0

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.path_targets, bool) or int(self.path_targets) != self.path_targets or \
                not 0 <= self.path_targets:
            raise ValueError(f"path_targets must be an integer >= 0, got {self.path_targets!r}")
        if self.path_targets and int(self.teacher_steps) < 2:
            raise ValueError(f"path_targets needs teacher_steps >= 2 (a solution with interior points), got "
                             f"teacher_steps {self.teacher_steps}")
        if self.teacher_solver not in TEACHER_SOLVERS:
            raise ValueError(f"unknown teacher_solver {self.teacher_solver!r}: expected one of {TEACHER_SOLVERS}")
        if self.teacher_spacing not in TEACHER_SPACINGS:
            raise ValueError(f"unknown teacher_spacing {self.teacher_spacing!r}: expected one of {TEACHER_SPACINGS}")
        if int(self.teacher_steps) < 1:
            raise ValueError(f"teacher_steps must be >= 1, got {self.teacher_steps}")


@dataclasses.dataclass(frozen=True)
class JvpOptions(SharedOptions):
    """The JVP objectives' options, with `lagrangian`'s defaults (direct residual, no tangent normalisation,
    output_scale_power 0).

    residual_form: "direct" (LSD of Boffi et al.): loss = |r|^2, differentiated through the JVP; "stopgrad"
        (sCM / Align Your Flow): loss = |X - sg(X - r)|^2, whose gradient is 2 r . dX/dparams with r the
        (normalised) residual, needing no backward pass through the JVP. Measured on the Gaussian closed form
        (tests/test_objectives.py, SD's schedule, the "angle" map started at the teacher's DDIM step, 300 Adam
        steps at lr 1e-3): 1-jump RMS error 0.94 -> eulerian direct 0.41, eulerian stopgrad with tangent
        normalisation and output_scale_power 2 0.36 (0.36 at lr 3e-4 too), the same without tangent
        normalisation 1.10 (diverging); lagrangian direct 0.04.
    tangent_normalization, tangent_norm_c: r <- r / (|r| + c), |r| the per-example L2 norm (sCM, c = 0.1).
    tangent_warmup_steps, tangent_warmup_max: the network's JVP term is multiplied by
        tangent_warmup_max * min(step / tangent_warmup_steps, 1) (sCM's linear ramp, 10k steps there; 0 = off,
        factor 1). `step` comes from batch["step"] (() or (B,)), which the trainer must then provide.
    jvp: "exact" (jax.jvp / torch.func.jvp) or "finite_difference" (central difference with step fd_eps
        in theta, the angle the objectives differentiate by; for kernels or shardings without forward-mode AD).
    jump_scale_normalization: X and the residual of a jump (s, t) are multiplied by 1 / max(1, |c_x(s, t)|), c_x
        the factor by which X(x_s, s, t) = c_x x_s + c_pred F amplifies x_s (alpha_t / alpha_s for an epsilon
        teacher: about 15 for SD's jump from t = 999 to clean data). Without it, the long jumps of epsilon
        teachers from the noise end dominate the gradients of the JVP objectives and training stalls (measured
        on the Gaussian closed form); v, flow and sample teachers have |c_x| <= ~1.4, so it barely changes them.
    """

    residual_form: str = "direct"
    tangent_normalization: bool = False
    tangent_norm_c: float = 0.1
    tangent_warmup_steps: int = 0
    tangent_warmup_max: float = 1.0
    jvp: str = "exact"
    fd_eps: float = 5e-3
    jump_scale_normalization: bool = True

    def __post_init__(self):
        super().__post_init__()
        if self.residual_form not in RESIDUAL_FORMS:
            raise ValueError(f"unknown residual_form {self.residual_form!r}: expected 'stopgrad' or 'direct'")
        if not isinstance(self.tangent_normalization, bool):
            raise ValueError(f"tangent_normalization must be true or false, got {self.tangent_normalization!r}")
        if self.jvp not in JVP_METHODS:
            raise ValueError(f"unknown jvp {self.jvp!r}: expected 'exact' or 'finite_difference'")
        if not self.fd_eps > 0:
            raise ValueError(f"fd_eps must be > 0, got {self.fd_eps}")


@dataclasses.dataclass(frozen=True)
class EulerianOptions(JvpOptions):
    """`eulerian`'s defaults: the stop-gradient residual, tangent normalisation and output_scale_power 2.

    Without tangent normalisation the stop-gradient form diverged on the digits default job (loss 80 -> 1950
    in 140 steps, output_scale_power 2). Why p = 2: the stop-gradient form moves F by sin(d) r, and near the
    diagonal (d -> 0), where r = v - F carries the teacher's velocity, that vanishes; with p = 2 the step is
    r / sin(d). Digits default job (300 steps, 100 samples, MSE to the teacher's DDIM-50 at 1 / 2 / 4 jumps,
    untrained 1.65 / 0.63 / 0.16), eulerian stopgrad with tangent normalisation: p = 0 0.15 / 0.16 / 0.43,
    p = 1 0.12 / 0.082 / 0.091, p = 2 0.074 / 0.046 / 0.032 (seed 1: 0.088 / 0.042 / 0.032).
    """

    residual_form: str = "stopgrad"
    tangent_normalization: bool = True
    output_scale_power: float = 2.0


@dataclasses.dataclass(frozen=True)
class ProgressiveOptions(SharedOptions):
    """`progressive`: progressive_anchor_weight weighs the anchor term, which matches the map's velocity at
    t = s to the teacher's (without it the semigroup condition alone has trivial solutions)."""

    progressive_anchor_weight: float = 1.0


OBJECTIVE_OPTIONS: dict[str, type[SharedOptions]] = {
    "pairs": PairsOptions,
    "lagrangian": JvpOptions,
    "eulerian": EulerianOptions,
    "progressive": ProgressiveOptions,
}
"""The objectives (in the order the command line lists them) and their options classes; the loss functions
of both backends are registered under these names."""


def objective_names() -> tuple[str, ...]:
    """The registered objectives' names (the choices of `--objective.names`)."""
    return tuple(OBJECTIVE_OPTIONS)


def options_class(name: str) -> type[SharedOptions]:
    """The options class of the objective `name`; ValueError naming the known objectives for another name."""
    if name not in OBJECTIVE_OPTIONS:
        raise ValueError(f"unknown objective {name!r}: expected one of {objective_names()}")
    return OBJECTIVE_OPTIONS[name]


def owners(option: str) -> tuple[str, ...]:
    """The objectives whose options class has the field `option`."""
    return tuple(n for n, cls in OBJECTIVE_OPTIONS.items() if option in {f.name for f in dataclasses.fields(cls)})


def check_objective_names(registered, backend: str) -> None:
    """RuntimeError unless a backend's registry of loss functions (`registered`, names) holds exactly the
    objectives of `OBJECTIVE_OPTIONS` (each backend calls it at import)."""
    missing = [n for n in OBJECTIVE_OPTIONS if n not in registered]
    extra = [n for n in registered if n not in OBJECTIVE_OPTIONS]
    if missing or extra:
        raise RuntimeError(f"{backend}: objectives registered {tuple(registered)} differ from "
                           f"spec.objective_options.OBJECTIVE_OPTIONS {objective_names()} (missing {missing}, "
                           f"without options class {extra})")


def objective_options(name: str, options=None) -> SharedOptions:
    """The options the objective `name` runs with (an instance of `options_class(name)`), from None (its
    defaults), an instance of its options class (as is), an `ObjectiveOptions` (a run's settings) or a dict of
    option names (as `ObjectiveOptions`: keys this objective lacks are ignored, a key no objective has raises
    ValueError naming it). Unknown name: ValueError naming the known objectives."""
    cls = options_class(name)
    if type(options) is cls:
        return options
    if isinstance(options, SharedOptions):
        raise TypeError(f"objective {name!r} takes {cls.__name__} (or a dict or ObjectiveOptions), "
                        f"got {type(options).__name__}")
    return ObjectiveOptions.create(options).for_objective(name)


# --------------------------------------------------------------------------------------------------
# A run's settings: one flat namespace over every registered objective's options.

_UNSET_SPELLINGS = {"residual_form": ("auto",)}
"""Old spellings of "each objective's own default" (None), still read (an old run's config.json, old flags)."""


class _Settings:
    """The methods of `ObjectiveOptions` (its fields are generated from `OBJECTIVE_OPTIONS`)."""

    def __post_init__(self):
        for name, spellings in _UNSET_SPELLINGS.items():
            if getattr(self, name) in spellings:
                object.__setattr__(self, name, None)
        if isinstance(self.time_pairs, dict):
            _check_time_pair_keys(self.time_pairs)
            object.__setattr__(self, "time_pairs", TimePairConfig(**self.time_pairs))
        for name in OBJECTIVE_OPTIONS:  # every value checked, and held as its objectives' classes hold it
            options = self.for_objective(name)
            for f in dataclasses.fields(options):
                if getattr(self, f.name) is not None:
                    object.__setattr__(self, f.name, getattr(options, f.name))

    def for_objective(self, name: str) -> SharedOptions:
        """The options of the objective `name`: its class's defaults with every one of these settings that its
        class has and that is not None (None: the objective's own default)."""
        cls = options_class(name)
        return cls(**{f.name: getattr(self, f.name) for f in dataclasses.fields(cls)
                      if getattr(self, f.name) is not None})

    @classmethod
    def create(cls, options=None):
        """From None (defaults), a dict (unknown keys raise ValueError naming them) or an instance."""
        if options is None:
            return cls()
        if isinstance(options, cls):
            return options
        if isinstance(options, dict):
            return cls().updated(options)
        raise TypeError(f"objective options must be a dict or ObjectiveOptions, got {type(options).__name__}")

    def updated(self, changes: dict):
        """These settings with `changes` (a dict of option names) applied on top; `time_pairs` given as a dict
        updates this one's fields (the others kept). Unknown keys raise ValueError naming them."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"unknown objective option(s) {unknown}: known options are {sorted(known)}")
        changes = dict(changes)
        if isinstance(changes.get("time_pairs"), dict):
            _check_time_pair_keys(changes["time_pairs"])
            changes["time_pairs"] = dataclasses.replace(self.time_pairs, **changes["time_pairs"])
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_json(cls, text: str, base=None, objectives=None):
        """From a JSON object (the `--objective.options` flag, an old run's config.json) of the options that
        differ from `base` (None: the defaults; `updated`); ValueError naming the problem (not JSON, not an
        object, an unknown option, a bad value, or, with `objectives` (names) given, a key none of them has)."""
        try:
            data = json.loads(text or "{}")
        except json.JSONDecodeError as err:
            raise ValueError(f"not valid JSON: {err}") from None
        if not isinstance(data, dict):
            raise ValueError(f"must be a JSON object of options, got {type(data).__name__}")
        options = (cls() if base is None else base).updated(data)
        unused = [] if objectives is None else [k for k in data if not set(objectives) & set(owners(k))]
        if unused:
            raise ValueError(f"option(s) {unused} belong to none of the objectives {tuple(objectives)} (options of "
                             f"{', '.join(f'{k}: {list(owners(k))}' for k in unused)})")
        return options

    def to_json(self) -> str:
        """The settings that differ from the defaults, as a compact JSON object (`from_json` reads it back)."""
        default = type(self)()
        changed = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                   if getattr(self, f.name) != getattr(default, f.name)}
        if "time_pairs" in changed:
            changed["time_pairs"] = dataclasses.asdict(self.time_pairs)
        return json.dumps(changed, separators=(", ", ": "))


def _settings_fields() -> list[tuple[str, typing.Any, dataclasses.Field]]:
    """Every option name of the registered objectives, first occurrence first, with its default where all
    classes that have it agree, else None (each objective keeps its own)."""
    defaults: dict[str, list] = {}
    types: dict[str, typing.Any] = {}
    for cls in OBJECTIVE_OPTIONS.values():
        for f in dataclasses.fields(cls):
            defaults.setdefault(f.name, []).append(f.default)
            types.setdefault(f.name, f.type)
    return [(name, f"{types[name]} | None",
             dataclasses.field(default=values[0] if all(v == values[0] for v in values) else None))
            for name, values in defaults.items()]


ObjectiveOptions = dataclasses.make_dataclass(
    "ObjectiveOptions", _settings_fields(), bases=(_Settings,), frozen=True,
    namespace={"__module__": __name__, "__doc__": """A run's objective settings (`--objective.options`,
    `config.ObjectiveConfig.options`): one field per option of any registered objective (the union of the
    `OBJECTIVE_OPTIONS` classes' fields), each applying to every objective whose class has it
    (`for_objective`). A field's default is its objectives' common default, or None where their defaults
    differ (residual_form, tangent_normalization, output_scale_power: each objective keeps its own). Flat as
    the flag's JSON and an old run's config.json ("auto" read as None)."""})


def _check_time_pair_keys(fields: dict) -> None:
    """ValueError naming the keys of a `time_pairs` dict that are not `TimePairConfig` fields."""
    known = {f.name for f in dataclasses.fields(TimePairConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"unknown time_pairs option(s) {unknown}: known are {sorted(known)}")
