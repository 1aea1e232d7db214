"""``/healthz`` and the settings that production relies on."""

import pytest
from django.db import connection

pytestmark = pytest.mark.django_db


def test_healthz_is_ok_when_postgres_and_redis_answer(client):
    response = client.get("/healthz")
    assert response.status_code == 200, response.content
    assert response.json() == {"status": "ok", "waiting": 0}


def test_healthz_is_503_naming_redis_when_redis_is_down(client, settings):
    settings.REDIS_URL = "redis://127.0.0.1:1/0"
    response = client.get("/healthz")
    assert response.status_code == 503
    assert any(p.startswith("redis") for p in response.json()["problems"]), response.json()


def test_healthz_is_503_naming_postgresql_when_the_database_is_down(client):
    real_port = connection.settings_dict["PORT"]
    connection.close()
    connection.settings_dict["PORT"] = 1
    try:
        response = client.get("/healthz")
    finally:
        connection.settings_dict["PORT"] = real_port
        connection.close()
    assert response.status_code == 503
    assert any(p.startswith("postgresql") for p in response.json()["problems"]), response.json()


def test_healthz_only_answers_get(client):
    assert client.post("/healthz").status_code == 405


def test_celery_acknowledges_late_and_prefetches_one(settings):
    assert settings.CELERY_TASK_ACKS_LATE is True
    assert settings.CELERY_WORKER_PREFETCH_MULTIPLIER == 1


def test_soft_time_limit_comes_before_the_hard_one(settings):
    assert settings.CELERY_TASK_SOFT_TIME_LIMIT < settings.CELERY_TASK_TIME_LIMIT
