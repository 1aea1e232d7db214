"""Fuzz the JSON API from its own OpenAPI document with schemathesis.

Requests are generated from ``/api/openapi.json`` (valid and invalid bodies, path
parameters, missing credentials) and sent through the WSGI application; every response
must be below 500 and conform to the document: status code, content type, headers and
body schema. Bounded to a few dozen examples per operation so it runs in seconds.
"""

import uuid

import pytest
import schemathesis
from django.core.handlers.wsgi import WSGIHandler
from django.core.signals import request_finished, request_started
from django.db import close_old_connections
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings

from tasksignal.api import openapi_document
from tasksignal.auth import create_token
from tasksignal.models import TaskRun

MAX_EXAMPLES = 30
FUZZ_TASK = "tests.fuzz.job"


@pytest.fixture
def wsgi_in_test_transaction(db):
    """Let WSGI requests run inside the test's transaction, as Django's test client does.

    Django closes "old" database connections at the start and end of each request; inside
    a test that would close the connection holding the test's transaction.
    """
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    yield
    request_started.connect(close_old_connections)
    request_finished.connect(close_old_connections)


@pytest.fixture
def fuzz_auth(django_user_model) -> dict[str, str]:
    """Headers of a superuser's token."""
    user = django_user_model.objects.create_superuser("fuzz", "fuzz@example.com", "pw")
    return {"Authorization": f"Bearer {create_token(user)[1]}"}


@pytest.fixture
def known_task_id() -> str:
    """A task the API knows, so that generated requests also reach the success paths."""
    task_id = str(uuid.uuid4())
    TaskRun.objects.create(task_id=task_id, task_name=FUZZ_TASK, state=TaskRun.State.RUNNING)
    return task_id


# Loaded at collection (no request, no database): schemathesis' lazy ``from_fixture``
# does not run on pytest 9. test_api_openapi.py checks that this is the served document.
schema = schemathesis.openapi.from_dict(openapi_document())
schema.app = WSGIHandler()


#: Body fields whose accepted values are configuration, not shape (a setting, the signal
#: registry): the document can only say "a string", so a well-formed request naming an
#: unlisted task or signal is rightly refused with 400. Such requests are checked for
#: everything but acceptance, then sent again with a value the API accepts.
CONFIGURED_VALUES = {"task": FUZZ_TASK, "signal": "cancel_task"}


@pytest.mark.django_db
@schema.parametrize()
# derandomize: the same examples on every run, so a red CI run can be replayed and a
# green one means the same inputs passed (widen MAX_EXAMPLES to explore further).
@hypothesis_settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_every_answer_conforms_to_the_document_and_none_is_a_server_error(
    case, fuzz_auth, known_task_id, wsgi_in_test_transaction, settings
):
    settings.TASKSIGNAL_STARTABLE_TASKS = [FUZZ_TASK]
    settings.TASKSIGNAL_MAX_WAIT = 0.05  # a generated ?wait must not hold the run up
    configured = isinstance(case.body, dict) and CONFIGURED_VALUES.keys() & case.body.keys()
    excluded = [schemathesis.checks.positive_data_acceptance] if configured else []
    case.call_and_validate(headers=fuzz_auth, excluded_checks=excluded)
    if not case.meta.generation.mode.is_positive:
        return
    # Random ids and names are unknown: send the request again to what exists.
    if "task_id" in case.path_parameters:
        case.path_parameters = {**case.path_parameters, "task_id": known_task_id}
    if configured:
        case.body = {**case.body, **{key: CONFIGURED_VALUES[key] for key in configured}}
    if configured or "task_id" in case.path_parameters:
        case.call_and_validate(headers=fuzz_auth)
