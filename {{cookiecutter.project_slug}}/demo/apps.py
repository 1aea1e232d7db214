"""Demo app configuration: registers the demo's own signal kind."""

from django.apps import AppConfig


class DemoConfig(AppConfig):
    name = "demo"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from demo.tasks import set_step_seconds
        from tasksignal.registry import register_signal

        register_signal("set_step_seconds", set_step_seconds, label="Set seconds per step")
