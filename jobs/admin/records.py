from django import forms
from django.contrib import admin, messages
from django.db import models
from django_celery_results import admin as results_admin
from django_celery_results.models import GroupResult, TaskResult

from jobs import services
from jobs.admin.paginators import EstimatedCountPaginator
from jobs.models import Alert, AlertRule, ApiToken, Job, JobLog, JobType


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
    paginator = EstimatedCountPaginator
    raw_id_fields = ["submitted_by", "schedule", "parent", "job_type"]
    inlines = [JobLogInline]

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False


# --- API tokens ---------------------------------------------------------------------


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    """Staff create tokens for users (the secret is shown once) and revoke them."""

    list_display = ["name", "user", "prefix", "created_at", "last_used_at", "revoked_at"]
    list_filter = [("revoked_at", admin.EmptyFieldListFilter)]
    list_select_related = ["user"]
    search_fields = ["name", "prefix", "user__username"]
    raw_id_fields = ["user"]
    actions = ["revoke"]

    def get_fields(self, request, obj=None):
        if obj is None:
            return ["user", "name"]
        return ["user", "name", "prefix", "created_at", "last_used_at", "revoked_at"]

    def get_readonly_fields(self, request, obj=None):
        # A token is never edited: it is created, used, and revoked.
        return [] if obj is None else self.get_fields(request, obj)

    def has_delete_permission(self, request, obj=None) -> bool:
        # Revoking keeps the record (and is audited); a deleted token would leave no trace.
        return False

    def save_model(self, request, obj, form, change) -> None:
        if change:
            return
        token, secret = services.api_token_create(user=obj.user, name=obj.name, actor=request.user)
        obj.pk, obj.prefix, obj.key_hash, obj.created_at = (
            token.pk, token.prefix, token.key_hash, token.created_at
        )  # fmt: skip
        self.message_user(
            request,
            f"The token for {obj.user} is {secret} — copy it now: it is not shown again.",
            messages.WARNING,
        )

    @admin.action(description="Revoke selected tokens", permissions=["change"])
    def revoke(self, request, queryset) -> None:
        revoked = 0
        for token in queryset.filter(revoked_at__isnull=True).select_related("user"):
            services.api_token_revoke(token=token, user=request.user)
            revoked += 1
        self.message_user(request, f"Revoked {revoked} token(s).", messages.SUCCESS)


# --- Dashboard and alerts: alert admins; Celery's result records, fast at scale ------


@admin.register(AlertRule)
class AlertRuleAdmin(admin.ModelAdmin):
    formfield_overrides = {models.URLField: {"assume_scheme": "https"}}
    list_display = ["name", "enabled", "job_type", "on_failure", "on_schedule_missed",
                    "on_heartbeat_lost", "emails", "webhook_url", "min_interval"]  # fmt: skip
    list_filter = ["enabled", "on_failure", "on_schedule_missed", "on_heartbeat_lost"]
    list_select_related = ["job_type"]
    search_fields = ["name", "emails", "webhook_url"]
    fieldsets = [
        (None, {"fields": ["name", "enabled", "job_type"]}),
        ("When", {"fields": ["on_failure", "on_schedule_missed", "on_heartbeat_lost"]}),
        ("Whom", {"fields": ["emails", "webhook_url", "webhook_secret", "min_interval"]}),
    ]

    def get_form(self, request, obj=None, change=False, **kwargs):
        # The secret is kept (render_value) but not shown on screen.
        kwargs["widgets"] = {"webhook_secret": forms.PasswordInput(render_value=True)}
        return super().get_form(request, obj, change, **kwargs)


@admin.register(Alert)
class AlertAdmin(admin.ModelAdmin):
    list_display = ["created_at", "rule", "kind", "subject", "suppressed", "email_sent",
                    "webhook_status"]  # fmt: skip
    list_filter = ["email_sent"]
    list_select_related = ["rule"]
    raw_id_fields = ["rule", "job"]
    show_full_result_count = False
    paginator = EstimatedCountPaginator

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False


class FastTaskResultAdmin(results_admin.TaskResultAdmin):
    """No date drill-down, no DISTINCT filters, no COUNT(*), exact-id search only."""

    # django-celery-results' admin is unannotated: mypy types its options from their
    # values (a str, a 5-tuple), narrower than the ModelAdmin options they set.
    date_hierarchy = None  # type: ignore[assignment]
    list_filter = ["status"]  # type: ignore[assignment]
    search_fields = ["=task_id"]  # type: ignore[assignment]
    show_full_result_count = False
    paginator = EstimatedCountPaginator


class FastGroupResultAdmin(results_admin.GroupResultAdmin):
    # As above: the base's options are typed from their values.
    date_hierarchy = None  # type: ignore[assignment]
    list_filter: list[str] = []  # type: ignore[assignment,misc]
    search_fields = ["=group_id"]  # type: ignore[assignment]
    show_full_result_count = False
    paginator = EstimatedCountPaginator


admin.site.unregister(TaskResult)
admin.site.register(TaskResult, FastTaskResultAdmin)
admin.site.unregister(GroupResult)
admin.site.register(GroupResult, FastGroupResultAdmin)
