"""Job specs and their queues: pure functions, no database."""

from __future__ import annotations

from dataclasses import replace

import pytest

from embedfill.config import ProviderConfig, TableName, TargetConfig
from embedfill.jobs.queue import queue_for, queues_for
from embedfill.jobs.spec import SETTINGS, JobSpec, fingerprint, vector_settings

# procrastinate NOTIFYs on 'procrastinate_queue_v1#' || queue; PostgreSQL's channel
# names are at most 63 bytes
CHANNEL_PREFIX = "procrastinate_queue_v1#"


def _target(**kw: object) -> TargetConfig:
    base = TargetConfig(
        name="tickets",
        table=TableName("app", "SupportTickets"),
        id_column="id",
        text="{subject}\n\n{body}",
        embedding_column="emb",
        provider="openai",
    )
    return replace(base, **kw)  # type: ignore[arg-type]


PROVIDER = ProviderConfig(name="openai", kind="openai", model="text-embedding-3-small")


def test_every_setting_that_decides_a_vector_is_in_the_fingerprint() -> None:
    settings = vector_settings(_target(), PROVIDER)
    assert set(settings) == set(SETTINGS)
    assert settings["dimensions"] == 1536  # the model's known size
    assert "sk-" not in repr(settings)  # names only, never a key


@pytest.mark.parametrize(
    ("setting", "target", "provider"),
    [
        ("model", _target(), replace(PROVIDER, model="text-embedding-3-large")),
        ("dimensions", _target(), replace(PROVIDER, dimensions=512)),
        ("text", _target(text="{subject}"), PROVIDER),
        ("max_input_tokens", _target(), replace(PROVIDER, max_input_tokens=100)),
        ("tenant_key_sql", _target(tenant_key_sql="select 1"), PROVIDER),
        ("api_key_env", _target(), replace(PROVIDER, api_key_env="OTHER_KEY")),
    ],
)
def test_a_worker_configured_otherwise_is_told_which_setting_differs(
    setting: str, target: TargetConfig, provider: ProviderConfig
) -> None:
    job = JobSpec("backfill", "tickets", 1, "emb", vector_settings(_target(), PROVIDER))
    mine = vector_settings(target, provider)
    assert job.differs(mine, platform_key=False) == setting
    assert fingerprint(mine) != job.fingerprint
    sentence = job.refusal(setting, mine, 7)
    assert sentence.startswith("job 7 (tickets) writes vectors with") and sentence.endswith(".")
    assert sentence.count(".") >= 1 and "\n" not in sentence


def test_the_same_settings_are_the_same_job_and_a_missing_key_is_a_refusal() -> None:
    settings = vector_settings(_target(), PROVIDER)
    job = JobSpec("refresh", "tickets", 1, "emb", settings, platform_key=True)
    assert job.differs(dict(settings), platform_key=True) is None
    assert job.differs(dict(settings), platform_key=False) == "api_key_env"
    assert "not set here" in job.refusal("api_key_env", settings, 3)
    assert fingerprint(dict(reversed(list(settings.items())))) == job.fingerprint


def test_a_job_from_before_specs_is_read_from_its_parameters() -> None:
    state = {
        "kind": None,
        "spec": None,
        "parameters": {"watch": True, "refresh": True},
        "target": "tickets",
        "table_oid": 5,
        "column_name": "emb",
    }
    spec = JobSpec.from_record(state)
    assert (spec.kind, spec.behaviour.open_ended, spec.settings) == ("watch", True, {})
    assert spec.differs({"model": "anything"}, platform_key=False) is None
    assert spec.queue == queue_for("tickets")  # the queue every worker still listens to
    again = JobSpec.from_record(
        {
            **state,
            "kind": "backfill",
            "spec": JobSpec(
                "backfill", "tickets", 5, "emb", {"model": "m"}, platform_key=True
            ).to_json(),
        }
    )
    assert again.settings == {"model": "m"} and again.platform_key


def test_queue_names_fit_postgres_notify_channels_whatever_the_target_name() -> None:
    long_name = "t" * 200
    for key in (False, True):
        queue = queue_for(long_name, "0123456789abcdef", key)
        assert len((CHANNEL_PREFIX + queue).encode()) <= 63
    assert queue_for("a", "f", True) != queue_for("a", "f", False) != queue_for("b", "f")
    with_key = queues_for("tickets", "f", has_key=True)
    assert queue_for("tickets", "f", True) in with_key
    assert queue_for("tickets", "f", True) not in queues_for("tickets", "f", has_key=False)
