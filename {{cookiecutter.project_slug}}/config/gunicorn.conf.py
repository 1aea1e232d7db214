"""gunicorn settings; each can be overridden by the environment variable named beside it."""

import os

bind = f"0.0.0.0:{os.environ.get('PORT', '8000')}"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
# Threads let one worker overlap database and Redis waits without the memory of a process,
# and serve API clients that wait for a stop (?wait=): a waiting thread costs no CPU and
# holds no database connection (they share DATABASE_POOL_SIZE), so there are many.
threads = int(os.environ.get("GUNICORN_THREADS", "150"))
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "30"))
# Shorter than compose's stop_grace_period, so in-flight requests finish before SIGKILL.
graceful_timeout = int(os.environ.get("GUNICORN_GRACEFUL_TIMEOUT", "20"))
accesslog = os.environ.get("GUNICORN_ACCESSLOG", "-")
errorlog = "-"
# Containers have a tmpfs at /dev/shm; the default /tmp may be a slow overlay filesystem.
worker_tmp_dir = "/dev/shm" if os.path.isdir("/dev/shm") else None  # noqa: S108
