from django.contrib import admin

from jobs.models import Job, JobLog, JobType


@admin.register(JobType)
class JobTypeAdmin(admin.ModelAdmin):
    list_display = ["title", "name", "task_name", "enabled", "queue", "priority", "max_retries"]
    list_filter = ["enabled", "queue"]
    search_fields = ["name", "title"]
    readonly_fields = ["name", "task_name", "created_at", "updated_at"]
    filter_horizontal = ["allowed_groups"]
    fieldsets = [
        (None, {"fields": ["name", "task_name", "title", "description", "enabled"]}),
        ("Who may run it", {"fields": ["allowed_groups"]}),
        (
            "Default options",
            {
                "fields": [
                    "queue",
                    "priority",
                    "countdown",
                    "expires",
                    ("max_retries", "retry_backoff", "retry_backoff_max"),
                    ("soft_time_limit", "time_limit"),
                ]
            },
        ),
        ("Record", {"fields": ["created_at", "updated_at"]}),
    ]

    def has_add_permission(self, request) -> bool:
        # Job types are declared in code (jobs/catalog.py), never typed in.
        return False


class JobLogInline(admin.TabularInline):
    model = JobLog
    extra = 0
    can_delete = False
    readonly_fields = ["created_at", "level", "logger", "message"]

    def has_add_permission(self, request, obj=None) -> bool:
        return False


@admin.register(Job)
class JobAdmin(admin.ModelAdmin):
    list_display = [
        "id",
        "task_name",
        "state",
        "submitted_by",
        "queue",
        "created_at",
        "finished_at",
    ]
    list_filter = ["state", "source"]
    list_select_related = ["submitted_by"]
    search_fields = ["=id"]
    show_full_result_count = False
    date_hierarchy = None
    raw_id_fields = ["submitted_by", "schedule", "parent", "job_type"]
    inlines = [JobLogInline]

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False
