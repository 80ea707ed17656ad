"""``python manage.py embedfill <command> ...``: the CLI, with the Django settings'
config and database. Same flags, output and exit codes as ``embedfill``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from embedfill import cli
from embedfill.contrib.django.conf import database, path_config, settings_config

# manage.py's own options, read before a command runs: not the CLI's
_DJANGO_OPTIONS = ("--settings", "--pythonpath")


def host() -> cli.Host:
    def config(path: Path | None) -> Any:
        return settings_config() if path is None else path_config(path)

    # ``--processes`` children: this manage.py again, with this process's import path
    manage = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0].endswith(".py") else None
    argv = (
        (sys.executable, manage, "embedfill")
        if manage
        else (sys.executable, "-m", "django", "embedfill")
    )
    return cli.Host(config=config, database=database, argv=argv)


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


class Command(BaseCommand):
    help = "embedfill's commands (status, backfill, watch, ...) with this project's settings."

    def run_from_argv(self, argv: list[str]) -> None:
        """``manage.py embedfill ARGS``: ARGS go to the CLI as they are; its exit code is
        this process's."""
        prog = f"{os.path.basename(argv[0])} {argv[1]}"
        code = cli.run(without_django_options(argv[2:]), host(), prog_name=prog)
        sys.stdout.flush()
        raise SystemExit(code)

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument(
            "args", nargs=argparse.REMAINDER, help="an embedfill command and its flags"
        )

    def handle(self, *args: str, **options: Any) -> None:
        """``call_command("embedfill", "status", "--json")``: a non-zero exit code is a
        CommandError (its ``returncode`` is the code)."""
        code = cli.run(list(args), host(), prog_name="embedfill")
        if code:
            raise CommandError(
                f"embedfill {' '.join(args[:1])} exited with {code}", returncode=code
            )
