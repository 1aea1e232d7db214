"""Error reporting (config/sentry.py): off without SENTRY_DSN, wired for Django and Celery with it.

Each check runs in a fresh interpreter: sentry-sdk's client is process-wide, and the settings
call ``config.sentry.init`` while Django loads them, as every web and worker process does.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: Loads the settings like a process of the project, raises in a task and in a view, and
#: prints what the SDK would have sent (a transport that keeps envelopes: nothing leaves).
PROBE = """
import json, django, sentry_sdk
from sentry_sdk.transport import Transport

django.setup()
client = sentry_sdk.get_client()
envelopes = []

class Keep(Transport):
    def capture_envelope(self, envelope):
        envelopes.append(envelope)

if client.is_active():
    client.transport = Keep(client.options)
from celery import shared_task

@shared_task(name="tests.sentry_probe")
def failing():
    raise RuntimeError("task went wrong")

try:
    failing.apply(throw=True)
except RuntimeError:
    pass
from django.test import Client
Client(raise_request_exception=False).get("/healthz", HTTP_HOST="localhost")
sentry_sdk.flush()
from sentry_sdk.integrations.celery import CeleryIntegration
from sentry_sdk.integrations.django import DjangoIntegration
print(json.dumps({
    "active": client.is_active(),
    "environment": client.options.get("environment"),
    "django": client.get_integration(DjangoIntegration) is not None,
    "celery": client.get_integration(CeleryIntegration) is not None,
    "pii": client.options.get("send_default_pii"),
    "events": [
        item.payload.json.get("exception", {}).get("values", [{}])[-1].get("value")
        for envelope in envelopes for item in envelope.items if item.type == "event"
    ],
}))
"""


def _probe(**env: str) -> dict:
    environment = {
        key: value for key, value in os.environ.items() if not key.startswith("SENTRY_")
    } | {"DJANGO_SETTINGS_MODULE": "config.settings.test", **env}
    result = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_nothing_is_reported_without_a_dsn():
    seen = _probe(SENTRY_DSN="")
    assert seen["active"] is False
    assert seen["events"] == []


def test_with_a_dsn_task_errors_are_reported_with_django_and_celery_wired():
    # A DSN on a closed loopback port: the probe's transport keeps events, nothing is sent.
    seen = _probe(SENTRY_DSN="http://public@127.0.0.1:9/1", SENTRY_ENVIRONMENT="ci")
    assert seen["active"] is True
    assert seen["django"], seen
    assert seen["celery"], seen
    assert seen["environment"] == "ci"
    assert seen["pii"] is False
    assert "task went wrong" in seen["events"], seen
