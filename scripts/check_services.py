"""Check that PostgreSQL and Redis answer before the slow tests start; say how to fix it if not.

Usage: ``python scripts/check_services.py`` (``make services``). Reads ``DATABASE_URL`` and
``REDIS_URL`` (defaults: the local servers). Each check runs a real query (``SELECT 1``,
``PING``) with a 2 s timeout, because an open port is not a ready server.

Exit status: 0 when both answer, 2 when one does not (after printing what to install or start).
"""

from __future__ import annotations

import sys
from typing import Final

from baked import database_url, redact, redis_url

TIMEOUT_SECONDS: Final = 2

POSTGRES_HELP: Final = """\
PostgreSQL does not answer at {url}: {error}
  Start it:    pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start
  Install it:  apt-get install postgresql
  Or point DATABASE_URL at a server where user may CREATE DATABASE."""

REDIS_HELP: Final = """\
Redis does not answer at {url}: {error}
  Start it:    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" \
--appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log
  Install it:  apt-get install redis-server
  Or point REDIS_URL at another Redis server."""


def check_postgres(url: str) -> str:
    """Return the server version of the PostgreSQL at ``url``; raise when it does not answer."""
    import psycopg  # noqa: PLC0415 - imported here so --help works without dependencies

    with psycopg.connect(url, connect_timeout=TIMEOUT_SECONDS, autocommit=True) as connection:
        connection.execute("SELECT 1")
        return str(connection.execute("SHOW server_version").fetchone()[0])


def check_redis(url: str) -> str:
    """Return the server version of the Redis at ``url``; raise when it does not answer."""
    import redis  # noqa: PLC0415 - imported here so --help works without dependencies

    client = redis.Redis.from_url(
        url, socket_timeout=TIMEOUT_SECONDS, socket_connect_timeout=TIMEOUT_SECONDS
    )
    try:
        client.ping()
        return str(client.info("server")["redis_version"])
    finally:
        client.close()


def _first_line(error: Exception) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


def main() -> int:
    """Check both services; print a line for each and the fix for any that is down."""
    if "--help" in sys.argv[1:]:
        print(__doc__)
        return 0
    problems = []
    for name, url, check, help_text in (
        ("PostgreSQL", database_url(), check_postgres, POSTGRES_HELP),
        ("Redis", redis_url(), check_redis, REDIS_HELP),
    ):
        try:
            version = check(url)
        except Exception as error:  # any failure means "not usable"
            problems.append(help_text.format(url=redact(url), error=_first_line(error)))
        else:
            print(f"ok: {name} {version} at {redact(url)}")
    if problems:
        print("\n\n".join(problems), file=sys.stderr)
        print(
            "\nThe end-to-end tests need both services; start them and run again.", file=sys.stderr
        )
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
