"""Each error class carries its CLI exit code and its HTTP status side by side.

The table below is the contract: scripts read the exit codes, API clients the statuses.
A new EmbedfillError subclass anywhere in the package must declare both in its own body
and be added here; changing a row changes what users see.
"""

from __future__ import annotations

import importlib
import json
import pkgutil

import pytest

import embedfill
from embedfill.errors import EmbedfillError, JobConflict
from embedfill.http.app import _known_error

# class name: (exit code, HTTP status)
TABLE: dict[str, tuple[int, int]] = {
    "EmbedfillError": (1, 500),
    "ConfigError": (2, 503),  # the service's own configuration, not the request
    "UsageError": (2, 422),
    "TargetNotFound": (2, 404),
    "SchemaMismatch": (2, 503),
    "SideTableMissing": (2, 503),
    "RowSecurityHides": (2, 503),
    "ModelChanged": (2, 503),
    "PlanRefused": (2, 422),
    "NotFound": (1, 404),
    "WriteRefused": (3, 500),
    "ExtensionMissing": (2, 503),
    "KeyStoreError": (2, 503),
    "SchemaNotReady": (2, 503),
    "ProviderMisconfigured": (2, 503),
    "ProviderRejectsAll": (1, 500),
    "VectorsMisfit": (1, 500),
    "PrivilegeMissing": (5, 403),
    "DatabaseError": (1, 503),
    "NoFreeConnection": (1, 503),
    "RunAborted": (3, 500),
    "VerificationFailed": (3, 409),  # adopt --verify-sample refused
    "TargetBusy": (4, 409),
    "JobConflict": (4, 409),
    "JobNotFound": (1, 404),
    "ProviderError": (1, 500),
    "RateLimited": (1, 500),
    "ProviderUnavailable": (1, 500),
    "AuthFailed": (1, 500),
    "BadInput": (1, 500),
    "NoApiKey": (1, 500),
    "BadAnswer": (1, 500),
    "NonFiniteVector": (1, 500),
}


def _error_classes() -> dict[str, type[EmbedfillError]]:
    """EmbedfillError and every subclass defined anywhere in the package."""
    for module in pkgutil.walk_packages(embedfill.__path__, "embedfill."):
        if not module.name.endswith("__main__"):
            importlib.import_module(module.name)
    found: dict[str, type[EmbedfillError]] = {}
    todo: list[type[EmbedfillError]] = [EmbedfillError]
    while todo:
        cls = todo.pop()
        if cls.__module__.startswith("embedfill.") and cls not in found.values():
            assert cls.__name__ not in found, f"two error classes named {cls.__name__}"
            found[cls.__name__] = cls
        todo.extend(cls.__subclasses__())
    return found


CLASSES = _error_classes()


def _instance(cls: type[EmbedfillError]) -> EmbedfillError:
    if cls is JobConflict:
        return JobConflict("Job 7 is already done.", 7)
    return cls()


def test_the_table_names_every_error_class() -> None:
    assert sorted(CLASSES) == sorted(TABLE)


@pytest.mark.parametrize("name", sorted(TABLE))
def test_each_class_declares_its_exit_code_and_http_status(name: str) -> None:
    cls = CLASSES[name]
    own = vars(cls)
    assert "exit_code" in own and "http_status" in own, f"{name} must declare both itself"
    assert (cls.exit_code, cls.http_status) == TABLE[name]


@pytest.mark.parametrize("name", sorted(TABLE))
def test_the_service_answers_each_class_with_its_status(name: str) -> None:
    exc = _instance(CLASSES[name])
    response = _known_error(exc)
    assert response is not None
    assert response.status_code == TABLE[name][1]
    body = json.loads(bytes(response.body))
    expected: dict[str, object] = {"error": str(exc)}
    if name == "JobConflict":
        expected["job_id"] = 7
    assert body == expected
