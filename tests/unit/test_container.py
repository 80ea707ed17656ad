"""No container engine runs here, so the container files are checked for structure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]


def compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


def test_compose_services_healthchecks_and_volumes() -> None:
    data = compose()
    services = data["services"]
    assert set(services) == {"db", "embedfill"}
    assert services["db"]["image"].startswith("pgvector/pgvector:")
    for name, service in services.items():
        assert "container_name" not in service, name
        assert service["healthcheck"]["test"], name
    assert "curl" not in str(services["embedfill"]["healthcheck"])
    assert "/healthz" in str(services["embedfill"]["healthcheck"]["test"])
    assert services["embedfill"]["depends_on"]["db"]["condition"] == "service_healthy"
    env = services["embedfill"]["environment"]
    assert "@db:5432/" in env["DATABASE_URL"]  # service-name networking
    assert "ADMIN_SECRET" in env
    named = set(data["volumes"])
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            assert source in named, f"{source} is not a named volume"


def test_dockerfile_is_slim_pinned_non_root_and_checks_health_with_python() -> None:
    lines = [
        ln.strip()
        for ln in (ROOT / "Dockerfile").read_text().splitlines()
        if ln.strip() and not ln.strip().startswith("#")
    ]
    assert lines[0].startswith("FROM python:") and lines[0].endswith("-slim")
    text = "\n".join(lines)
    assert "-c requirements.lock" in text
    user = [ln for ln in lines if ln.startswith("USER ")]
    assert user and user[-1] != "USER root"
    health = next(ln for ln in lines if ln.startswith("HEALTHCHECK"))
    assert "curl" not in text and "wget" not in text
    assert "python" in text[text.index(health) :] and "/healthz" in text
    assert lines[-1].startswith("CMD") and "serve" in lines[-1]
