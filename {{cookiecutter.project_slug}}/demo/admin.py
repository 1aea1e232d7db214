"""Admin for the demo's records."""

from django.contrib import admin

from demo.models import DemoRecord, Report


@admin.register(DemoRecord)
class DemoRecordAdmin(admin.ModelAdmin):
    list_display = ["batch", "number", "created"]
    search_fields = ["batch"]


@admin.register(Report)
class ReportAdmin(admin.ModelAdmin):
    list_display = ["title", "pages", "rendered_pages", "created"]
    search_fields = ["title"]
