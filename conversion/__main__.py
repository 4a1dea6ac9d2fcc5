"""Command line: `python -m conversion <command> --help`. `--help` lists every command of
`cli_commands.COMMANDS` (to-flax, to-diffusers, export) with its one-line help.

Exit codes (`flowmap_jax.cli.cli_exit`): 0 done, 2 bad flags or bad input (a missing or malformed folder or
checkpoint); an unexpected failure keeps its traceback and exits 1.
"""

from __future__ import annotations

import argparse

from conversion import cli_commands
from flowmap_jax.cli import cli_exit


def build_parser() -> argparse.ArgumentParser:
    parser = cli_exit.ArgumentParser(
        prog="python -m conversion", description="Convert UNet weights and export trained flow maps.",
        epilog="`python -m conversion COMMAND --help` shows a command's arguments. Exit codes: 0 done, "
               "1 failed, 2 bad flags or bad input.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in cli_commands.COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError) as err:
        cli_exit.report(err)
        return cli_exit.USAGE
    return cli_exit.OK


if __name__ == "__main__":
    cli_exit.run_main(main)
