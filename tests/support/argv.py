"""Command lines in deployment files, checked with the CLI's own parser."""

from __future__ import annotations

import typer

from embedfill.cli import app


def parses(argv: list[str]) -> None:
    """``argv`` (``embedfill worker --metrics-port 9464``) as the CLI would take it, run
    through the CLI's own parser without running the command: a wrong flag raises."""
    assert argv[0] == "embedfill", argv
    group = typer.main.get_command(app)
    ctx = type(group).context_class(group, info_name="embedfill")
    command = group.get_command(ctx, argv[1])
    assert command is not None, argv
    command.make_context(argv[1], list(argv[2:]), parent=ctx)
