"""Command line: `python -m conversion <command> --help`.

  to-flax       diffusers UNet folder or hub id -> Flax params (safetensors, '/'-joined keys) + config.json
  to-diffusers  Flax params folder (as written by to-flax) -> diffusers UNet folder (safetensors)
"""

from __future__ import annotations

import argparse
import sys

from conversion import cli_commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m conversion", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for command in cli_commands.COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
