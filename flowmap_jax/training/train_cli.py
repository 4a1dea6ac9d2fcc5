"""The trainer's command line (on `tyro`): `parse_args(argv) -> TrainConfig` and `help_text(preset)`.

    python -m flowmap_jax.train                                 # the `digits` preset (default)
    python -m flowmap_jax.train --preset sd15 --teacher.path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --data.source shards --data.path /data/laion_shards --mesh.fsdp -1
    python -m flowmap_jax.train --optim.lr 3e-4 --run.steps 2000   # any field, `--section.field value`
    python -m flowmap_jax.train --lr 3e-4 --steps 2000             # short form where the name is unique
    python -m flowmap_jax.train -n 2000 -b 64 -t /my/teacher       # short aliases of the common flags
    python -m flowmap_jax.train --config runs/digits/config.json   # rerun a run as it was (flags still override)
    python -m flowmap_jax.train --preset sd15 --help               # every field, its choices and sd15's values
    python -m flowmap_jax.train --preset sdxl --teacher.path SDXL_FOLDER --data.path /data/sdxl_shards

Pure Python (no jax, no torch). The fields, their types and choices are `flowmap_jax.training.config`'s dataclasses; the
base values come from a preset (`flowmap_jax.training.presets.PRESETS`) or a run's config.json. Choice fields are
`Literal` types: `--help` lists their choices and a bad value fails at parse time.

Command-line rules (`parse_args`): `--section.field value` or `--section.field=value` (`-` and `_` alike);
a field name that occurs in only one section may be given alone (`--lr`); the aliases in the field
annotations (`-n`, `-b`, `-t`, `-o`, `-r`, `--lr`, ...). Booleans: `--run.export` / `--run.no_export`, or
a value true/false/1/0/yes/no/on/off. Tuples: space- or comma-separated (`--objective.names eulerian,pairs`).
`--preset NAME` or `--config FILE` picks the base values, whatever its position. An unknown flag, a
missing value, a value of the wrong type or outside a field's choices is a `ConfigError` naming the flag.
"""

from __future__ import annotations

import contextlib
import difflib
import io
import sys
import typing
from dataclasses import dataclass

import tyro

from flowmap_jax.training.config import (
    ConfigError,
    TrainConfig,
    config_fields,
    load_config_file,
    section_types,
    type_name,
    validate,
)
from flowmap_jax.training.presets import DEFAULT_PRESET, PRESETS
from flowmap_jax.spec.objective_options import ObjectiveOptions

# A thin pass keeps every flag spelling of the README working (short names, bool values, comma lists) and
# rewrites the flags to tyro's `--section.field` form; tyro parses the values, checks the choices and writes
# `--help` from `flowmap_jax.training.config`'s dataclasses, with the chosen preset's values.

PROG = "python -m flowmap_jax.train"
_BOOL_WORDS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False,
               "off": False}


@dataclass(frozen=True)
class _Flag:
    """One configurable field: its `section.field` name, its type hint (Annotated stripped) and the kind
    of value it takes: "bool" (none, or a bool word), "tuple" (one or more), "value" (exactly one)."""

    dotted: str
    hint: typing.Any

    @property
    def kind(self) -> str:
        if self.hint is bool:
            return "bool"
        return "tuple" if typing.get_origin(self.hint) is tuple else "value"

    @property
    def scalar(self) -> typing.Any:
        return typing.get_args(self.hint)[0] if self.kind == "tuple" else self.hint


def _aliases() -> dict[str, str]:
    """'-n' -> 'run.steps', ...: the aliases declared with `tyro.conf.arg(aliases=...)` on the fields."""
    out = {}
    for section, section_cls in section_types().items():
        for name, hint in typing.get_type_hints(section_cls, include_extras=True).items():
            for meta in getattr(hint, "__metadata__", ()):
                for alias in getattr(meta, "aliases", None) or ():
                    out[alias] = f"{section}.{name}"
    return out


def _flag_table() -> dict[str, _Flag]:
    """Every accepted spelling (without leading dashes for long flags, '-n' for short aliases; `_` for
    `-`) -> its field: 'section.field', the field name where it occurs in one section only, the aliases,
    and 'no_'-prefixed forms of the booleans."""
    fields = config_fields()
    table = {dotted: _Flag(dotted, hint) for dotted, (_, _, hint) in fields.items()}
    counts: dict[str, list[str]] = {}
    for dotted, (_, name, _) in fields.items():
        counts.setdefault(name, []).append(dotted)
    table.update({name: table[dotted[0]] for name, dotted in counts.items() if len(dotted) == 1})
    for alias, dotted in _aliases().items():
        table[alias.lstrip("-") if alias.startswith("--") else alias] = table[dotted]
    return table


def _is_flag(token: str) -> bool:
    """`--anything` or a short flag `-x`; `-1`, `-0.5` are values."""
    return token.startswith("--") or (len(token) >= 2 and token[0] == "-" and token[1].isalpha())


def _normalise(flag: _Flag, text: str) -> str:
    """A value as tyro takes it: integers written as floats ('1e3') become '1000'."""
    if flag.scalar is int:
        try:
            as_float = float(text)
        except ValueError:
            return text
        if as_float.is_integer() and not text.lstrip("+-").isdigit():
            return str(int(as_float))
    return text


def _split_argv(argv: typing.Sequence[str]):
    """(preset name or None, config file or None, wants help, tyro's argv,
    {'section.field': (the flag as typed, its value as typed)}).
    Raises `ConfigError` for a positional argument, an unknown flag or a missing value."""
    table = _flag_table()
    preset = config_file = None
    wants_help = False
    out: list[str] = []
    typed: dict[str, tuple[str, str]] = {}
    i = 0
    argv = list(argv)
    while i < len(argv):
        token = argv[i]
        i += 1
        if token in ("-h", "--help"):
            wants_help = True
            continue
        if not _is_flag(token):
            raise ConfigError(f"unexpected argument {token!r}: flags look like --section.field VALUE (see --help)")
        name, inline = (token.split("=", 1) + [None])[:2] if token.startswith("--") else (token, None)
        values = [] if inline is None else [inline]
        while inline is None and i < len(argv) and not _is_flag(argv[i]):
            values.append(argv[i])
            i += 1
        key = name[2:].replace("-", "_") if name.startswith("--") else name
        if key in ("preset", "-p", "config", "-c"):
            if len(values) != 1:
                what = "one of " + ", ".join(PRESETS) if key in ("preset", "-p") else "a config.json file"
                raise ConfigError(f"flag {name} needs one value: {what}")
            if key in ("preset", "-p"):
                if values[0] not in PRESETS:
                    raise ConfigError(f"flag {name}: unknown preset {values[0]!r}; known: {', '.join(PRESETS)}")
                preset = values[0]
            else:
                config_file = values[0]
            continue
        negated = False
        flag = table.get(key)
        if flag is None and "no_" in key:  # --run.no_export, --no_export
            head, _, tail = key.rpartition("no_")
            candidate = table.get(head + tail)
            if candidate is not None and candidate.kind == "bool" and head in ("", head.rstrip(".") + "."):
                flag, negated = candidate, True
        if flag is None:
            known = [k for k in table if not k.startswith("-")] + ["preset", "config"]
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            hint = f"; did you mean --{close[0]}?" if close else "; see --help"
            raise ConfigError(f"unknown flag {name}{hint}")
        typed[flag.dotted] = (name, " ".join(values))
        section, field_name = flag.dotted.split(".")
        if flag.kind == "bool":
            if len(values) > 1 or (values and values[0].lower() not in _BOOL_WORDS):
                raise ConfigError(f"flag {name} expects a boolean (true/false), got {' '.join(values)!r}")
            on = _BOOL_WORDS[values[0].lower()] if values else True
            out.append(f"--{section}.{'' if on != negated else 'no_'}{field_name}")
            continue
        if flag.kind == "tuple":
            values = [part for v in values for part in v.replace(" ", "").split(",") if part != ""]
            if not values:
                raise ConfigError(f"flag {name} needs one or more values (comma- or space-separated)")
        elif len(values) != 1:
            if not values:
                raise ConfigError(f"flag {name} needs a value ({type_name(flag.hint)})")
            raise ConfigError(f"flag {name} takes one value, got {len(values)}: {' '.join(values)}")
        if flag.kind == "tuple":
            out.append(f"--{flag.dotted}")
            out.extend(_normalise(flag, v) for v in values)
        else:  # the = form, so a value such as -x is not read as a flag
            out.append(f"--{flag.dotted}={_normalise(flag, values[0])}")
    return preset, config_file, wants_help, out, typed



def _description(source: str) -> str:
    paragraphs = [
        ("Distil a diffusion teacher into a few-step flow map. With no arguments: the embedded digits teacher, "
         "on whatever devices JAX sees (a CPU is enough, a few minutes)."),
        f"The defaults shown below are {source}.",
        (f"-p, --preset {{{','.join(PRESETS)}}}: start from this preset (default {DEFAULT_PRESET}). "
         "-c, --config FILE: start from a run's config.json instead, to rerun that run as it was. "
         "Either may stand anywhere; the other flags override it."),
        ("Every field is a flag: --section.field VALUE (or =VALUE; - and _ alike). A field name found in one "
         "section only may be given alone: --lr, --steps, --resume. Lists: --objective.names pairs eulerian "
         "(or pairs,eulerian). Booleans: --run.export / --run.no_export (or --run.export false)."),
        "Exit codes: 0 done, 1 the run failed, 2 bad flags or bad input.",
    ]
    return "\n\n".join(paragraphs)


def _as_config_error(typed: dict[str, tuple[str, str]]):
    """A tyro parse-error hook that raises `ConfigError` (one line, naming the flag as the user typed it)
    instead of tyro's boxed message. The hook API (`tyro._errors`) is tyro's private one: if it changes,
    the hook is not installed or returns None, and tyro prints its own message (still exit 2).

    Why private: tyro's public API (`tyro.cli`, `tyro.conf`, `tyro.constructors`; checked on tyro 1.0.17) reports
    a bad value only by printing a boxed message and raising `SystemExit(2)`; nothing public hands the caller
    the failing argument, so the one-line error naming the flag as typed cannot be built from it. This is the
    only function that touches `tyro._errors`; `tests/test_train_config.py::test_tyro_private_error_hook`
    fails when tyro's private API moves."""
    errors = getattr(tyro, "_errors", None)
    if errors is None or not hasattr(errors, "on_parse_error"):
        return contextlib.nullcontext()

    def flag_of(event) -> tuple[str, str, typing.Any]:
        """(the flag as typed, its value as typed, the field's type hint)."""
        names = [n for n in event.argument.lowered.name_or_flags if n.startswith("--") and "." in n]
        dotted = names[0][2:].replace("-", "_")
        flag, text = typed.get(dotted, (names[0], ""))
        return flag, text, config_fields()[dotted][2]

    def hook(event) -> None:
        try:
            if isinstance(event, errors.InvalidChoice):
                flag, _, _ = flag_of(event)
                message = f"flag {flag}: {event.value!r} is not one of {', '.join(map(str, event.choices))}"
            elif isinstance(event, errors.InstantiationFailure) and event.argument is not None:
                flag, text, hint = flag_of(event)
                many = typing.get_origin(hint) is tuple
                scalar = typing.get_args(hint)[0] if many else hint
                kind = {int: "integer", float: "number"}.get(scalar)
                if kind is None:
                    message = f"flag {flag}: {event.message}"
                else:
                    kind = f"{kind}s" if many else ("an " if kind == "integer" else "a ") + kind
                    message = f"flag {flag} expects {kind}, got {text!r}"
            elif isinstance(event, errors.BadValue):
                flag, text, _ = flag_of(event)
                message = f"flag {flag}: bad or missing value {text!r}"
            elif isinstance(event, errors.UnrecognizedArgs):
                message = f"unexpected argument(s) {' '.join(event.tokens)} (see --help)"
            else:
                return
        except (AttributeError, IndexError, KeyError, TypeError):  # an event this code does not know
            return
        raise ConfigError(message)

    return errors.on_parse_error(hook)


def _tyro_cli(base: TrainConfig, args: list[str], source: str, typed: dict[str, tuple[str, str]]) -> TrainConfig:
    with _as_config_error(typed):
        return tyro.cli(TrainConfig, default=base, args=args, prog=PROG, description=_description(source),
                        use_underscores=True)


def help_text(preset: str = DEFAULT_PRESET) -> str:
    """The `--help` text of `--preset preset` (every field with its type or choices and that preset's value)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        _tyro_cli(PRESETS[preset](), ["--help"], f"the {preset} preset's", {})
    return out.getvalue()


def parse_args(argv: typing.Sequence[str] | None = None) -> TrainConfig:
    """Build a `TrainConfig` from command-line arguments (see the module docstring): the base values of
    `--preset` (default digits) or `--config FILE`, then the other flags, then `validate`.

    Raises `ConfigError` for an unknown flag, a missing value, a value of the wrong type or outside a
    field's choices, and a failed `validate`; `--help` prints the help of the chosen preset or config
    and raises `SystemExit(0)`.
    """
    preset, config_file, wants_help, args, typed = _split_argv(sys.argv[1:] if argv is None else argv)
    if preset is not None and config_file is not None:
        raise ConfigError("give --preset or --config, not both (a run's config.json names its preset)")
    if config_file is not None:
        base = load_config_file(config_file)
        source = f"those of {config_file} (preset {base.preset})"
    else:
        preset = preset or DEFAULT_PRESET
        base, source = PRESETS[preset](), f"the {preset} preset's"
    config = _tyro_cli(base, ["--help"] if wants_help else args, source, typed)
    if "objective.options" in typed and not wants_help:  # the JSON updates the base's options, not the defaults
        flag, text = typed["objective.options"]
        try:
            config.objective.options = ObjectiveOptions.from_json(text, base=base.objective.options,
                                                                  objectives=config.objective.names)
        except (ValueError, TypeError) as error:
            raise ConfigError(f"{flag}: {error}") from None
    validate(config)
    return config

