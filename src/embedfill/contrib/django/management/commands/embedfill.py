"""``python manage.py embedfill <command> ...``: the CLI, with the Django settings'
config and database. Same flags, output and exit codes as ``embedfill``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from embedfill import cli
from embedfill.contrib.django.conf import database, path_config, settings_config

# manage.py's own options, read before a command runs: not the CLI's
_DJANGO_OPTIONS = ("--settings", "--pythonpath")


def host() -> cli.Host:
    """The CLI's config and database from the Django settings. ``--processes`` children
    run ``python -m django embedfill worker …`` with this process's settings module and
    import path (whatever script or server started this one)."""
    from django.conf import settings

    def config(path: Path | None) -> Any:
        return settings_config() if path is None else path_config(path)

    env = {
        "DJANGO_SETTINGS_MODULE": settings.SETTINGS_MODULE or "",
        "PYTHONPATH": os.pathsep.join(p for p in (os.getcwd(), *sys.path) if p),
    }
    return cli.Host(
        config=config,
        database=database,
        argv=(sys.executable, "-m", "django", "embedfill"),
        env=env,
    )


def without_django_options(args: list[str]) -> list[str]:
    out: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg in _DJANGO_OPTIONS:
            skip = True
        elif not arg.startswith(tuple(o + "=" for o in _DJANGO_OPTIONS)):
            out.append(arg)
    return out


class _Verbatim(CommandParser):
    """Takes the whole command line as the CLI's (``call_command("embedfill",
    "--debug", "status")``): Django's own options keep their defaults."""

    def parse_args(self, args: Any = None, namespace: Any = None) -> argparse.Namespace:
        parsed: argparse.Namespace = super().parse_args([], namespace)
        parsed.args = list(args or [])
        return parsed


class Command(BaseCommand):
    help = "embedfill's commands (status, backfill, watch, ...) with this project's settings."

    def create_parser(self, prog_name: str, subcommand: str, **kwargs: Any) -> CommandParser:
        parser = super().create_parser(prog_name, subcommand, **kwargs)
        parser.__class__ = _Verbatim  # Django's options keep their defaults
        return parser

    def print_help(self, prog_name: str, subcommand: str) -> None:
        """``manage.py help embedfill``: the CLI's own help."""
        cli.run(["--help"], host(), prog_name=f"{os.path.basename(prog_name)} {subcommand}")

    def run_from_argv(self, argv: list[str]) -> None:
        """``manage.py embedfill ARGS``: ARGS go to the CLI as they are; its exit code is
        this process's."""
        cli.load_dotenv()  # as `embedfill` does
        prog = f"{os.path.basename(argv[0])} {argv[1]}"
        code = cli.run(without_django_options(argv[2:]), host(), prog_name=prog)
        sys.stdout.flush()
        raise SystemExit(code)

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("args", nargs="*", help="an embedfill command and its flags")

    def handle(self, *args: str, **options: Any) -> None:
        """``call_command("embedfill", "status", "--json")``: a non-zero exit code is a
        CommandError (its ``returncode`` is the code)."""
        code = cli.run(list(args), host(), prog_name="embedfill")
        if code:
            what = " ".join(args[:1])
            raise CommandError(f"embedfill {what} exited with {code}", returncode=code)
