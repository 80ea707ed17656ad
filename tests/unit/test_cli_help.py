"""The command lists of `embedfill --help` (and of its groups) read as sentences."""

from __future__ import annotations

import typer

from embedfill import cli


def commands(group: typer.Typer) -> list[typer.models.CommandInfo]:
    out = list(group.registered_commands)
    for sub in group.registered_groups:
        assert sub.typer_instance is not None
        out += commands(sub.typer_instance)
    return out


def test_each_command_is_listed_by_its_first_sentence_on_one_line() -> None:
    listed = commands(cli.app)
    assert len(listed) > 15
    for info in listed:
        assert info.short_help, info.name
        # Typer keeps a docstring's line breaks in the list, cutting its sentences
        assert "\n" not in info.short_help and info.short_help.endswith("."), info.short_help
