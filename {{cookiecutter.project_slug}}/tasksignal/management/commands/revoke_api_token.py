"""``manage.py revoke_api_token --name NAME`` (or ``--prefix tsk_abc…``): delete API tokens."""

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from tasksignal.models import ApiToken


class Command(BaseCommand):
    """Delete the tokens with a name or a secret prefix; they stop working at once (within
    ``TASKSIGNAL_TOKEN_CACHE_SECONDS`` for a web process that used them just before)."""

    help = "Delete (revoke) the JSON API tokens with the given name, or whose secret starts so."

    def add_arguments(self, parser: CommandParser) -> None:
        """``--name`` or ``--prefix``."""
        which = parser.add_mutually_exclusive_group(required=True)
        which.add_argument("--name", help="Delete the tokens made with this --name.")
        which.add_argument("--prefix", help="Delete the token whose secret starts so (12 chars).")

    def handle(self, *args: str, name: str | None, prefix: str | None, **options: Any) -> None:
        """Delete them and say how many."""
        tokens = (
            ApiToken.objects.filter(name=name) if name else ApiToken.objects.filter(prefix=prefix)
        )
        deleted, _ = tokens.delete()
        if not deleted:
            raise CommandError(f"no token {'named ' + repr(name) if name else 'with that prefix'}")
        self.stdout.write(f"revoked {deleted} token(s)")
