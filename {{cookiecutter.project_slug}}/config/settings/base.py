"""Settings shared by every environment; read from the environment (12-factor).

Values come from environment variables, and from a ``.env`` file in the project root when
one exists (the variables already set win). ``.env.example`` documents every variable.
"""

from pathlib import Path

import environ
{%- if cookiecutter.use_sentry == "y" %}

from config import sentry
{%- endif %}

BASE_DIR = Path(__file__).resolve().parent.parent.parent
PROJECT_SLUG = "{{ cookiecutter.project_slug }}"

env = environ.Env()
env.read_env(BASE_DIR / ".env")
{%- if cookiecutter.use_sentry == "y" %}
# Errors of the web and the worker go to Sentry when SENTRY_DSN is set (config/sentry.py).
sentry.init(env.ENVIRON)
{%- endif %}

DEBUG = env.bool("DJANGO_DEBUG", default=False)
ALLOWED_HOSTS = env.list("DJANGO_ALLOWED_HOSTS", default=["localhost", "127.0.0.1"])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    # ArrayField and GinIndex of the lineage table (tasksignal.models.TaskLineage).
    "django.contrib.postgres",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "tasksignal",
{%- if cookiecutter.include_demo_tasks == "y" %}
    "demo",
{%- endif %}
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

# The load test's server mounts the revoke baseline too (loadtest/baseline.py).
ROOT_URLCONF = env("DJANGO_ROOT_URLCONF", default="config.urls")
WSGI_APPLICATION = "config.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASES = {
    "default": env.db("DATABASE_URL", default=f"postgres://postgres@127.0.0.1:5432/{PROJECT_SLUG}")
}
if env.bool("DATABASE_POOL", default=False):
    # The web process (bin/web turns this on): its threads share a few connections, and a
    # request waiting for a stop gives its own back. No health check per request: after a
    # PostgreSQL restart a broken pooled connection answers one 503 and is replaced.
    DATABASES["default"]["CONN_MAX_AGE"] = 0
    DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
        "min_size": 1,
        "max_size": env.int("DATABASE_POOL_SIZE", default=8),
        "timeout": env.float("DATABASE_POOL_TIMEOUT", default=10.0),
    }
else:
    # Reuse connections across tasks (and requests), but check them first: a worker
    # outlives many database restarts.
    DATABASES["default"]["CONN_MAX_AGE"] = env.int("CONN_MAX_AGE", default=60)
    DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "{{ cookiecutter.timezone }}"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
}

REDIS_URL = env("REDIS_URL", default="redis://127.0.0.1:6379/0")

# Celery ------------------------------------------------------------------------------
CELERY_BROKER_URL = env("CELERY_BROKER_URL", default=REDIS_URL)
CELERY_RESULT_BACKEND = env("CELERY_RESULT_BACKEND", default=REDIS_URL)
CELERY_TIMEZONE = TIME_ZONE
CELERY_TASK_DEFAULT_QUEUE = env("CELERY_TASK_DEFAULT_QUEUE", default="celery")
# A message is acknowledged after the task ends, so a worker that dies mid-task does not
# lose it: the broker hands it to the next worker (tasksignal skips it if it was cancelled).
CELERY_TASK_ACKS_LATE = True
# Long tasks: a worker takes one message per free process, so queued work is not hoarded
# by a busy worker (and a cancelled queued task is skipped where it lies).
CELERY_WORKER_PREFETCH_MULTIPLIER = env.int("CELERY_WORKER_PREFETCH_MULTIPLIER", default=1)
# Hard and soft limits bound every run, paused time included; the soft limit raises
# SoftTimeLimitExceeded in the task first so it can clean up.
CELERY_TASK_TIME_LIMIT = env.int("CELERY_TASK_TIME_LIMIT", default=3600)
CELERY_TASK_SOFT_TIME_LIMIT = env.int("CELERY_TASK_SOFT_TIME_LIMIT", default=3540)
# With acks_late on Redis, a message unacknowledged for longer than the visibility timeout
# is delivered again. Keeping it above the hard time limit means no run (paused or not)
# outlives it, so a long pause never produces a duplicate.
CELERY_BROKER_TRANSPORT_OPTIONS = {
    "visibility_timeout": env.int("CELERY_VISIBILITY_TIMEOUT", default=2 * CELERY_TASK_TIME_LIMIT),
    # Kombu keeps unacknowledged messages in one hash per Redis database; another service
    # on the same database with a shorter visibility timeout would redeliver ours while
    # they run. A key prefix gives this service its own.
    "global_keyprefix": env("CELERY_BROKER_KEY_PREFIX", default=f"{PROJECT_SLUG}:"),
    # Once the visibility timeout has passed, kombu looks for messages to restore every
    # interval x throttle seconds (100 by default); make chaos looks every 2 s.
    "unacked_restore_interval": env.int("CELERY_UNACKED_RESTORE_INTERVAL", default=10),
    "unacked_restore_throttle": env.int("CELERY_UNACKED_RESTORE_THROTTLE", default=10),
}
CELERY_RESULT_EXPIRES = env.int("CELERY_RESULT_EXPIRES", default=24 * 3600)
# In the worker only (config/celery.py turns it on there), a task that ends while Redis is
# away must not end FAILURE because its result could not be stored: the backend tries again
# (10 ms, doubling, at most 2 s apart) for about a minute. Web requests answer 503 at once.
CELERY_RESULT_BACKEND_MAX_RETRIES = env.int("CELERY_RESULT_BACKEND_MAX_RETRIES", default=40)
CELERY_RESULT_BACKEND_MAX_SLEEP_BETWEEN_RETRIES_MS = 2000
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# Let Django's LOGGING configure the worker's loggers instead of Celery taking the root logger.
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
CELERY_WORKER_CONCURRENCY = env.int("CELERY_WORKER_CONCURRENCY", default=None)
# Celery's Django fixup closes every database connection before and after each task unless
# this is set (then only every this many tasks): a new connection per task otherwise.
# config/celery.py checks connections per task the way Django does per request instead.
CELERY_DB_REUSE_MAX = env.int("CELERY_DB_REUSE_MAX", default=100_000)
{%- if cookiecutter.use_celery_beat == "y" %}
CELERY_BEAT_SCHEDULE = {
    "tasksignal-sweep": {
        "task": "tasksignal.sweep",
        "schedule": env.float("TASKSIGNAL_SWEEP_INTERVAL", default=60.0),
    },
}
{%- endif %}

# Task signalling (see tasksignal/conf.py for what each one does) ----------------------
TASKSIGNAL_CHANNEL = env("TASKSIGNAL_CHANNEL", default=f"{PROJECT_SLUG}:tasksignal")
TASKSIGNAL_CANCEL_GRACE = env.float("TASKSIGNAL_CANCEL_GRACE", default=1.0)
TASKSIGNAL_KILL_AFTER = env.float("TASKSIGNAL_KILL_AFTER", default=5.0)
TASKSIGNAL_RECONCILE_INTERVAL = env.float("TASKSIGNAL_RECONCILE_INTERVAL", default=2.0)
TASKSIGNAL_RECORD_RUNS = env.bool("TASKSIGNAL_RECORD_RUNS", default=True)
TASKSIGNAL_SIGNAL_EXPIRY = env.float("TASKSIGNAL_SIGNAL_EXPIRY", default=24 * 3600.0)
TASKSIGNAL_RETENTION = env.float("TASKSIGNAL_RETENTION", default=7 * 24 * 3600.0)
TASKSIGNAL_TOKEN_CACHE_SECONDS = env.float("TASKSIGNAL_TOKEN_CACHE_SECONDS", default=5.0)
TASKSIGNAL_MAX_WAIT = env.float("TASKSIGNAL_MAX_WAIT", default=60.0)
{%- if cookiecutter.include_demo_tasks == "y" %}
# Tasks the JSON API may start (POST /api/tasks/).
TASKSIGNAL_STARTABLE_TASKS = [
    "demo.tasks.add",
    "demo.tasks.cooperative_job",
    "demo.tasks.sleepy_job",
    "demo.tasks.wait_for_io_job",
    "demo.tasks.gil_job",
    "demo.tasks.write_records",
    "demo.tasks.workflow",
    "demo.tasks.sibling_job",
]
{%- else %}
# Tasks the JSON API may start (POST /api/tasks/): add your own task names.
TASKSIGNAL_STARTABLE_TASKS: list[str] = []
{%- endif %}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"},
    },
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env("DJANGO_LOG_LEVEL", default="INFO")},
    "loggers": {
        "django.db.backends": {"level": "WARNING"},
    },
}
