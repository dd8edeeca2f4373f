import ast
import json

from django import forms
from django.contrib import admin, messages
from django.db import models
from django_celery_results import admin as results_admin
from django_celery_results.models import GroupResult, TaskResult

from jobs import selectors, services, specs
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
    # The stored parameters hold secrets in clear (the worker needs them): shown masked.
    exclude = ["params"]
    readonly_fields = ["parameters"]

    @admin.display(description="parameters")
    def parameters(self, obj: Job) -> str:
        return json.dumps(selectors.job_params_display(obj), indent=1, ensure_ascii=False)

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False


# --- API tokens ---------------------------------------------------------------------


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    """Staff create tokens for themselves, superusers for anyone (the secret is shown
    once), and revoke them. A token acts as its owner: minting one for someone else
    would be acting as them, which only a superuser may do anyway."""

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

    def get_changeform_initial_data(self, request) -> dict:
        return {"user": request.user.pk, **super().get_changeform_initial_data(request)}

    def get_form(self, request, obj=None, change=False, **kwargs):
        form = super().get_form(request, obj, change=change, **kwargs)
        if obj is None and not request.user.is_superuser:
            form = type(form.__name__, (form,), {"clean_user": _only_yourself(request.user)})
        return form

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


def _only_yourself(actor):
    def clean_user(form):
        user = form.cleaned_data.get("user")
        if user is not None and user.pk != actor.pk:
            raise forms.ValidationError(
                "You may create tokens only for yourself (a superuser may for others)."
            )
        return user

    return clean_user


# --- Dashboard and alerts: alert admins; Celery's result records, fast at scale ------


class AlertRuleForm(forms.ModelForm):
    """The webhook secret is never written into the page: blank keeps the stored one."""

    clear_webhook_secret = forms.BooleanField(
        label="Remove the webhook secret", required=False, help_text="Send unsigned from now on."
    )

    class Meta:
        model = AlertRule
        fields = ["webhook_secret"]  # the admin adds the others (its fieldsets)
        widgets = {"webhook_secret": forms.PasswordInput(render_value=False)}

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.instance.webhook_secret and "webhook_secret" in self.fields:
            field = self.fields["webhook_secret"]
            field.help_text = f"{field.help_text} A secret is stored: leave blank to keep it."

    def clean(self) -> dict:
        super().clean()
        data = self.cleaned_data
        if data.get("clear_webhook_secret"):
            data["webhook_secret"] = ""
        elif not data.get("webhook_secret"):
            data["webhook_secret"] = self.instance.webhook_secret
        return data


@admin.register(AlertRule)
class AlertRuleAdmin(admin.ModelAdmin):
    form = AlertRuleForm
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

    def get_fieldsets(self, request, obj=None):
        if obj is not None and not self.has_change_permission(request, obj):
            whom = ["emails", "webhook_url", "webhook_signed", "min_interval"]  # read-only
        elif obj is not None and obj.webhook_secret:
            whom = ["emails", "webhook_url", "webhook_secret", "clear_webhook_secret",
                    "min_interval"]  # fmt: skip
        else:
            whom = ["emails", "webhook_url", "webhook_secret", "min_interval"]
        return [*self.fieldsets[:2], ("Whom", {"fields": whom})]

    def get_readonly_fields(self, request, obj=None):
        return [*super().get_readonly_fields(request, obj), "webhook_signed"]

    @admin.display(description="webhook signed", boolean=True)
    def webhook_signed(self, obj: AlertRule) -> bool:
        return bool(obj.webhook_secret)


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
    """No date drill-down, no DISTINCT filters, no COUNT(*), exact-id search only.

    Celery stores the kwargs as the message's ``kwargsrepr`` (masked when Jobsite or
    its beat sent the run), or as the raw kwargs for runs sent by other code: the
    kwargs of job types with secret fields are shown masked, or not at all.
    """

    # django-celery-results' admin is unannotated: mypy types its options from their
    # values (a str, a 5-tuple), narrower than the ModelAdmin options they set.
    date_hierarchy = None  # type: ignore[assignment]
    list_filter = ["status"]  # type: ignore[assignment]
    search_fields = ["=task_id"]  # type: ignore[assignment]
    show_full_result_count = False
    paginator = EstimatedCountPaginator
    fieldsets = tuple(  # type: ignore[assignment]  # the same shape; the stubs are narrower
        (name, {**options, "fields": tuple(
            "task_kwargs_masked" if field == "task_kwargs" else field
            for field in options["fields"]
        )})
        for name, options in results_admin.TaskResultAdmin.fieldsets
    )  # fmt: skip

    def get_readonly_fields(self, request, obj=None):
        return [*super().get_readonly_fields(request, obj), "task_kwargs_masked"]

    @admin.display(description="task kwargs")
    def task_kwargs_masked(self, obj: TaskResult) -> str | None:
        spec = specs.by_task_name(obj.task_name or "")
        if spec is None or not spec.secret_fields:
            return obj.task_kwargs
        kwargs = _stored_kwargs(obj.task_kwargs)
        if kwargs is None:
            return f"(not shown: {spec.title} has secret parameters)"
        return repr(spec.mask(kwargs))


def _stored_kwargs(raw: str | None) -> dict | None:
    """The kwargs django-celery-results stored: JSON of Celery's repr, or of the dict."""
    try:
        value = json.loads(raw or "null")
        if isinstance(value, str):
            value = ast.literal_eval(value)  # literals only, never code
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


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
