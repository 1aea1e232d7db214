"""URLs of the tasksignal JSON API, mounted under ``/api/``."""

app_name = "tasksignal"
urlpatterns: list = []
