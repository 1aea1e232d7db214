"""Admin for the demo's records."""

from django.contrib import admin

from demo.models import DemoRecord


@admin.register(DemoRecord)
class DemoRecordAdmin(admin.ModelAdmin):
    list_display = ["batch", "number", "created"]
    search_fields = ["batch"]
