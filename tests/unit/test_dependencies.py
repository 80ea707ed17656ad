"""The job queue's version range is the one CI tests: pyproject.toml allows procrastinate
from the release `make test-oldest` runs (the Makefile's PROCRASTINATE_OLDEST) up to,
not beyond, the minor release `make test` runs (requirements.lock's pin)."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]


def _allowed() -> Requirement:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    found = [Requirement(r) for r in project["dependencies"]]
    return next(r for r in found if r.name == "procrastinate")


def _oldest() -> Version:
    match = re.search(r"^PROCRASTINATE_OLDEST := (\S+)$", (ROOT / "Makefile").read_text(), re.M)
    assert match, "the Makefile names the oldest procrastinate it tests"
    return Version(match[1])


def _locked() -> Version:
    match = re.search(r"^procrastinate==(\S+)$", (ROOT / "requirements.lock").read_text(), re.M)
    assert match, "requirements.lock pins procrastinate"
    return Version(match[1])


def test_the_allowed_range_is_the_tested_one() -> None:
    allowed, oldest, locked = _allowed(), _oldest(), _locked()
    floors = [Version(s.version) for s in allowed.specifier if s.operator == ">="]
    assert floors == [oldest], f"pyproject.toml allows procrastinate{allowed.specifier}"
    assert allowed.specifier.contains(locked)
    # nothing newer than the locked minor release, which no test has run
    assert not allowed.specifier.contains(Version(f"{locked.major}.{locked.minor + 1}.0"))


def test_the_tests_run_against_the_release_they_say() -> None:
    """Under `make test-oldest` the oldest release is the one imported (not the venv's)."""
    running = Version(importlib.metadata.version("procrastinate"))
    assert _allowed().specifier.contains(running)
    expected = os.environ.get("EMBEDFILL_EXPECT_PROCRASTINATE")
    if expected:
        import procrastinate

        assert running == Version(expected)
        assert str(Path(procrastinate.__file__).resolve()).startswith(str(ROOT / ".oldest"))


# procrastinate's schema, as `embedfill migrate` installs it from the running release
# (db/schema.py, migration 5): a database migrated with one release of the range must be
# right for every other, so every release it allows brings this same schema. A release
# that changes it needs a migration of ours before the range may include it.
QUEUE_SCHEMA_SHA256 = "c70ec4b400a60ad9592787653aae5ae77ae41bf801d56b5bd2712751a07f2009"


def test_every_allowed_release_brings_the_same_queue_schema() -> None:
    from procrastinate.schema import SchemaManager

    digest = hashlib.sha256(SchemaManager.get_schema().encode()).hexdigest()
    assert digest == QUEUE_SCHEMA_SHA256
