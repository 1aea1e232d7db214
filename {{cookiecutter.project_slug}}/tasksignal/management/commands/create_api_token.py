"""``manage.py create_api_token <username> [--name NAME]``: make a JSON API bearer token."""

from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser

from tasksignal.auth import create_token


class Command(BaseCommand):
    """Print a new token for a user; only its hash is stored, so save it now."""

    help = (
        "Create a bearer token for the JSON API acting as USERNAME, with that user's "
        "permissions, and print it. It is shown only this once: only its hash is stored."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        """``username`` and ``--name``."""
        parser.add_argument("username", help="The user the token acts as.")
        parser.add_argument("--name", default="", help="What the token is for (max 100 chars).")

    def handle(self, *args: str, username: str, name: str, **options: Any) -> None:
        """Create the token and print its secret on stdout, alone on its line."""
        user_model = get_user_model()
        try:
            user = user_model._default_manager.get_by_natural_key(username)
        except user_model.DoesNotExist:
            raise CommandError(
                f"no user {username!r}; create one first (manage.py createsuperuser, or the admin)"
            ) from None
        if not user.is_active:
            raise CommandError(f"user {username!r} is inactive; its tokens would be refused")
        if len(name) > 100:
            raise CommandError("--name is limited to 100 characters")
        token, secret = create_token(user, name)
        self.stderr.write(
            f"Token {token.prefix}… for {username}; it is shown once, store it now. "
            "Send it as 'Authorization: Bearer <token>'."
        )
        self.stdout.write(secret)
