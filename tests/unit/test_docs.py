"""The docs site: its reference pages are what the code gives now, every key and alert is
explained, and ``mkdocs build --strict`` (broken links and anchors fail) passes."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent


def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_reference", ROOT / "docs/gen_reference.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_committed_reference_pages_are_what_the_code_gives() -> None:
    for path, text in generator().pages().items():
        committed = (ROOT / "docs" / path).read_text()
        assert committed == text, f"docs/{path} is stale: run `make docs` and commit it"


def test_every_command_key_route_error_and_alert_is_on_its_page() -> None:
    gen = generator()
    cli = gen.cli_page()
    for command in ("backfill", "watch", "keys set", "triggers install", "model cutover"):
        assert f"## `embedfill {command}`" in cli
    for section in ("providers", "targets", "engine"):
        for key, _, _, meaning in gen.config_rows(section):
            assert meaning, f"[{section}] {key} has no comment in config.py to explain it"
    http = gen.http_page()
    assert "POST /api/v1/admin/backfill-embeddings" in http and "/readyz" in http
    assert "`TargetBusy` | 4 | 409" in gen.errors_page()
    sentences = gen.error_sentences()
    assert len(sentences) >= 100
    texts = {text for _, text, _ in sentences}
    assert "Both … and …_FILE are set; unset one of them." in texts
    for rule in gen.alert_rules():
        notes = rule.get("annotations", {})
        assert notes.get("description") and notes.get("runbook"), rule["alert"]


def test_mkdocs_builds_strictly(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "index.html").exists() and (tmp_path / "reference/cli/index.html").exists()


def test_the_readmes_demo_toml_is_the_demos_config() -> None:
    """The README's "After the demo" shows the demo's target as the TOML to start from: it is the
    config the demo runs with (config.default_config), not a copy that drifted."""
    import re
    import tomllib

    from embedfill.config import default_config, parse_config

    text = (ROOT / "README.md").read_text()
    block = re.search(r"```toml\n(.*?)```", text[text.index("### After the demo") :], re.S)
    assert block is not None
    shown, demo = parse_config(tomllib.loads(block.group(1))), default_config()
    assert (shown.targets, shown.providers) == (demo.targets, demo.providers)
