"""The periodic-task admin, made safe.

Replaces django-celery-beat's PeriodicTaskAdmin: a schedule runs a job type from the
catalogue (never a typed task name), its parameters are edited with that job type's
own form (the same validation as a manual submit) and stored as JSON in ``kwargs``;
its queue is one the job type allows, its priority 0-9. Each schedule shows its next
runs in its time zone, its crontab in words, DST warnings and its runs; "Run now"
sends a run with all of the schedule's options. Every write goes through services.
"""

from __future__ import annotations

import json
from typing import cast

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import get_object_or_404, render
from django.urls import path, reverse
from django.utils.decorators import method_decorator
from django.utils.html import format_html
from django.views.decorators.http import require_GET, require_POST
from django_celery_beat import admin as beat_admin
from django_celery_beat.models import (
    ClockedSchedule,
    CrontabSchedule,
    IntervalSchedule,
    PeriodicTask,
    SolarSchedule,
)

from jobs import services, specs
from jobs.models import JobType
from jobs.selectors import schedule_slots, schedules
from jobs.services.messages import _check_size, reserved_headers

PARAMS_PREFIX = "params"
FRAGMENT_TEMPLATE = "admin/django_celery_beat/periodictask/_params.html"


def _catalogued_job_types(user):
    """The job types ``user`` may schedule: catalogued, not internal, and ones they may run."""
    names = [s.name for s in specs.all_specs() if not s.internal]
    return JobType.objects.runnable_by(user).filter(name__in=names)


KEEP_SECRET = "Leave blank to keep the stored value."  # noqa: S105 (a help text)


def _queues(job_type: JobType) -> list[str]:
    queues = list(job_type.spec.queues) if job_type.spec else []
    return queues if job_type.queue in queues else [job_type.queue, *queues]


class ScheduleForm(forms.ModelForm):
    """A PeriodicTask whose task and kwargs come from a job type and its parameter form.

    ``user`` (set by ScheduleAdmin.get_form) limits the job types to those they may run.
    Stored secret parameters are never rendered: their inputs stay empty, and an empty
    one keeps the stored value.
    """

    user = None

    job_type = forms.ModelChoiceField(
        queryset=JobType.objects.none(),
        label="Job type",
        help_text="What the schedule runs: a job type from the catalogue.",
    )
    queue = forms.ChoiceField(label="Queue", help_text="One of the queues the job type allows.")
    priority = forms.IntegerField(
        label="Priority", min_value=0, max_value=9, help_text="0 lowest, 9 highest."
    )
    headers = forms.CharField(
        label="Message headers",
        required=False,
        widget=forms.Textarea(attrs={"rows": 2, "cols": 60}),
        help_text='A JSON object of extra message headers, e.g. {"tenant": "acme"}.',
    )

    class Meta:
        model = PeriodicTask
        fields = [
            "name", "enabled", "description", "interval", "crontab", "solar", "clocked",
            "start_time", "one_off", "expires", "expire_seconds", "queue", "exchange",
            "routing_key", "priority", "headers",
        ]  # fmt: skip

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        cast(forms.ModelChoiceField, self.fields["job_type"]).queryset = _catalogued_job_types(
            self.user
        )
        self.selected = self._selected_job_type()
        self.params_form = self._params_form()
        self.params_changed = False
        self._set_job_type_defaults()
        self.fields["job_type"].widget.attrs.update(
            {
                # Choosing another job type swaps in its parameter fields (htmx).
                "hx-get": reverse("admin:django_celery_beat_periodictask_params"),
                "hx-target": "#schedule-params",
                "hx-trigger": "change",
            }
        )

    def _selected_job_type(self) -> JobType | None:
        if self.is_bound:
            raw = self.data.get("job_type") or ""
            return (
                _catalogued_job_types(self.user).filter(pk=raw).first() if raw.isdigit() else None
            )
        if self.initial.get("job_type"):
            return _catalogued_job_types(self.user).filter(pk=self.initial["job_type"]).first()
        spec = specs.by_task_name(self.instance.task) if self.instance.task else None
        return JobType.objects.filter(name=spec.name).first() if spec else None

    def _params_form(self) -> forms.Form | None:
        if self.selected is None or self.selected.spec is None:
            return None
        spec = self.selected.spec
        stored = {}
        if self.instance.pk and self.instance.task == self.selected.task_name:
            stored = schedules.loads_object(self.instance.kwargs)
        kept = {name: stored[name] for name in spec.secret_fields if stored.get(name)}
        if self.is_bound:
            data = self.data.copy()  # type: ignore[attr-defined]  # a QueryDict
            for name, value in kept.items():
                if not data.get(f"{PARAMS_PREFIX}-{name}"):
                    data[f"{PARAMS_PREFIX}-{name}"] = value
            form = spec.form(data=data, prefix=PARAMS_PREFIX)
        else:
            initial = {k: v for k, v in stored.items() if k not in spec.secret_fields}
            form = spec.form(initial=initial or None, prefix=PARAMS_PREFIX)
        for name in spec.secret_fields:
            field = form.fields.get(name)
            if field is None:
                continue
            # Never rendered back into the page, not even after an invalid post.
            field.widget = forms.PasswordInput(attrs=field.widget.attrs, render_value=False)
            if name in kept:
                field.required = False
                field.help_text = f"{field.help_text} {KEEP_SECRET}".strip()
        return form

    def _set_job_type_defaults(self) -> None:
        job_type = self.selected
        queue_field = cast(forms.ChoiceField, self.fields["queue"])
        queue_field.choices = [(q, q) for q in _queues(job_type)] if job_type else []
        if job_type is None or self.is_bound:
            return
        self.initial["job_type"] = job_type.pk
        if not self.initial.get("queue"):
            self.initial["queue"] = job_type.queue
        if self.initial.get("priority") is None:
            self.initial["priority"] = job_type.priority

    def clean_headers(self) -> str:
        raw = (self.cleaned_data.get("headers") or "").strip() or "{}"
        try:
            headers = json.loads(raw)
        except ValueError as exc:
            raise forms.ValidationError(f"Not valid JSON: {exc}.") from None
        if not isinstance(headers, dict):
            raise forms.ValidationError('Give a JSON object, e.g. {"tenant": "acme"}.')
        if not all(isinstance(v, (str, int, float, bool)) for v in headers.values()):
            raise forms.ValidationError("Header values must be strings, numbers or booleans.")
        reserved = reserved_headers(headers)
        if reserved:
            raise forms.ValidationError(f"Reserved for Celery and Jobsite: {', '.join(reserved)}.")
        return json.dumps(headers)

    def clean(self) -> dict:
        super().clean()
        data = self.cleaned_data
        if self.selected is None:
            return data
        if self.params_form is None or not self.params_form.is_valid():
            raise forms.ValidationError("The parameters are not valid: see Parameters below.")
        params = specs.to_json(self.params_form.cleaned_data)
        try:
            _check_size(params)
        except forms.ValidationError as exc:
            raise forms.ValidationError(exc.messages) from None
        if data.get("expires") and data.get("expire_seconds") is not None:
            raise forms.ValidationError("Set an expiry date or expiry seconds, not both.")
        # Set here, never from the request: the task name comes from the catalogue.
        kwargs = json.dumps(params)
        self.params_changed = kwargs != self.instance.kwargs
        self.instance.task = self.selected.task_name
        self.instance.kwargs = kwargs
        self.instance.args = "[]"
        return data


def _masked_kwargs(obj: PeriodicTask) -> str:
    params = schedules.loads_object(obj.kwargs)
    spec = specs.by_task_name(obj.task)
    return json.dumps(spec.mask(params) if spec else params, indent=1)


admin.site.unregister(PeriodicTask)


@admin.register(PeriodicTask)
class ScheduleAdmin(admin.ModelAdmin):
    form = ScheduleForm
    list_display = [
        "name", "job_type", "enabled", "schedule_in_words", "next_run", "last_run", "runs",
    ]  # fmt: skip
    # No filter sidebar: the columns need the width (search covers name, task, description).
    search_fields = ["name", "task", "description"]
    actions = ["enable_schedules", "disable_schedules", "run_schedules_now"]
    list_select_related = ["interval", "crontab", "solar", "clocked"]
    fieldsets = [
        (None, {"fields": ["name", "job_type", "enabled", "description"]}),
        (
            "Schedule",
            {
                "fields": ["interval", "crontab", "solar", "clocked", "start_time", "one_off"],
                "description": "Choose exactly one of interval, crontab, solar or clocked "
                "(a clocked schedule must be one-off). Crontab times are in the crontab's "
                "time zone.",
            },
        ),
        (
            "Execution options",
            {
                "fields": [
                    "queue",
                    "priority",
                    ("expires", "expire_seconds"),
                    ("exchange", "routing_key"),
                    "headers",
                ]
            },
        ),
    ]

    # --- Columns and read-only fields -------------------------------------------------

    @admin.display(description="job type")
    def job_type(self, obj: PeriodicTask) -> str:
        spec = specs.by_task_name(obj.task)
        if spec is None:
            return format_html('<span class="mono" title="declared in code">{}</span>', obj.task)
        return spec.title

    @admin.display(description="schedule")
    def schedule_in_words(self, obj: PeriodicTask) -> str:
        return schedules.describe(obj)

    @admin.display(description="next run")
    def next_run(self, obj: PeriodicTask) -> str:
        runs = schedules.next_runs(obj, count=1)
        return _two_lines(runs[0]) if runs else "—"

    @admin.display(description="last run (total)", ordering="last_run_at")
    def last_run(self, obj: PeriodicTask) -> str:
        if not obj.last_run_at:
            return "never"
        when = obj.last_run_at.astimezone(schedules.schedule_timezone(obj))
        return format_html("{} ({})", _two_lines(when), obj.total_run_count)

    @admin.display(description="runs")
    def runs(self, obj: PeriodicTask) -> str:
        url = reverse("jobs-history") + "?" + _query(schedule=obj.name)
        return format_html('<a href="{}">history</a>', url)

    @admin.display(description="parameters")
    def parameters(self, obj: PeriodicTask) -> str:
        return _masked_kwargs(obj)

    def get_fieldsets(self, request, obj=None):
        fieldsets = list(super().get_fieldsets(request, obj))
        if not self._can_edit(request, obj):
            fieldsets.insert(1, ("Parameters", {"fields": ["parameters"]}))
        return fieldsets

    def get_form(self, request, obj=None, change=False, **kwargs):
        form = super().get_form(request, obj, change=change, **kwargs)
        # A class made for this request by modelform_factory: the attribute is this user's.
        form.user = request.user  # type: ignore[attr-defined]
        return form

    def _can_edit(self, request, obj) -> bool:
        return self.has_change_permission(request, obj) if obj else self.has_add_permission(request)

    def has_change_permission(self, request, obj=None) -> bool:
        # Schedules declared in code (CELERY_BEAT_SCHEDULE) are rewritten by beat at
        # start-up: edit them there, not here (enable/disable still works).
        if obj is not None and specs.by_task_name(obj.task) is None:
            return False
        # A schedule of a job type the editor may not run is theirs to see, not to change.
        user = request.user
        if (
            obj is not None
            and not user.is_superuser
            and not _catalogued_job_types(user).filter(task_name=obj.task).exists()
        ):
            return False
        return super().has_change_permission(request, obj)

    def has_run_permission(self, request) -> bool:
        return request.user.has_perm("django_celery_beat.change_periodictask")

    def has_enable_permission(self, request) -> bool:
        return request.user.has_perm("django_celery_beat.change_periodictask")

    # --- Writes, through services -----------------------------------------------------

    def save_model(self, request, obj, form, change) -> None:
        changed = form.changed_data + (["parameters"] if form.params_changed else [])
        services.schedule_save(schedule=obj, user=request.user, created=not change, changed=changed)

    def delete_model(self, request, obj) -> None:
        services.schedule_delete(schedules=[obj], user=request.user)

    def delete_queryset(self, request, queryset) -> None:
        services.schedule_delete(schedules=queryset, user=request.user)

    @admin.action(description="Enable selected schedules", permissions=["enable"])
    def enable_schedules(self, request, queryset) -> None:
        count = services.schedule_set_enabled(schedules=queryset, enabled=True, user=request.user)
        self.message_user(request, f"Enabled {count} schedule(s).", messages.SUCCESS)

    @admin.action(description="Disable selected schedules", permissions=["enable"])
    def disable_schedules(self, request, queryset) -> None:
        count = services.schedule_set_enabled(schedules=queryset, enabled=False, user=request.user)
        self.message_user(request, f"Disabled {count} schedule(s).", messages.SUCCESS)

    @admin.action(description="Run selected schedules now", permissions=["run"])
    def run_schedules_now(self, request, queryset) -> None:
        for schedule in queryset:
            self._run_now(request, schedule)

    def _run_now(self, request, schedule: PeriodicTask) -> None:
        try:
            job = services.schedule_run_now(schedule=schedule, user=request.user)
        except services.ActionError as exc:
            self.message_user(request, str(exc), messages.ERROR)
            return
        self.message_user(
            request,
            format_html(
                'Sent “{}” now: run <a href="{}">{}</a>.',
                schedule.name,
                job.get_absolute_url(),
                job.pk,
            ),
            messages.SUCCESS,
        )

    # --- Extra views --------------------------------------------------------------------

    def get_urls(self):
        opts = self.model._meta
        name = f"{opts.app_label}_{opts.model_name}"
        extra = [
            path(
                "params/",
                self.admin_site.admin_view(self.params_view),
                name=f"{name}_params",
            ),
            path(
                "<path:object_id>/versions/<path:version_id>/restore/",
                self.admin_site.admin_view(self.restore_view),
                name=f"{name}_restore",
            ),
            path(
                "<path:object_id>/run-now/",
                self.admin_site.admin_view(self.run_now_view),
                name=f"{name}_run_now",
            ),
        ]
        return extra + super().get_urls()

    @method_decorator(require_POST)
    def run_now_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        return _run_now_view(self, request, object_id)

    @method_decorator(require_POST)
    def restore_view(self, request: HttpRequest, object_id: str, version_id: str) -> HttpResponse:
        return _restore_view(self, request, object_id, version_id)

    @method_decorator(require_GET)
    def params_view(self, request: HttpRequest) -> HttpResponse:
        return _params_view(self, request)

    # --- Pages ------------------------------------------------------------------------

    def changelist_view(self, request, extra_context=None):
        extra_context = {**(extra_context or {}), "beat": schedules.beat_status()}
        return super().changelist_view(request, extra_context)

    def change_view(self, request, object_id, form_url="", extra_context=None):
        obj = self.get_object(request, object_id)
        context = dict(extra_context or {})
        if obj is not None:
            context.update(_summary(obj))
            context["can_run"] = self.has_run_permission(request)
            context["can_restore"] = self.has_change_permission(request, obj)
        return super().change_view(request, object_id, form_url, context)

    def render_change_form(self, request, context, *args, **kwargs):
        form = context["adminform"].form
        context["params_form"] = getattr(form, "params_form", None)
        context["params_url"] = reverse("admin:django_celery_beat_periodictask_params")
        response = super().render_change_form(request, context, *args, **kwargs)
        if request.method == "POST":
            # Only an invalid form is rendered again after a POST: say so with a 400.
            response.status_code = 400
        return response


def _two_lines(when) -> str:
    return format_html("{}<br>{}", f"{when:%Y-%m-%d}", f"{when:%H:%M:%S %Z}")


def _query(**params) -> str:
    from urllib.parse import urlencode

    return urlencode(params)


def _summary(obj: PeriodicTask) -> dict:
    return {
        "schedule_words": schedules.describe(obj),
        "schedule_tz": schedules.schedule_timezone(obj).key,
        "next_runs": schedules.next_runs(obj),
        "dst_notes": schedules.dst_notes(obj),
        "schedule_runs": schedules.schedule_runs(obj),
        "history_url": reverse("jobs-history") + "?" + _query(schedule=obj.name),
        "run_now_url": reverse("admin:django_celery_beat_periodictask_run_now", args=[obj.pk]),
        "is_catalogued": specs.by_task_name(obj.task) is not None,
        "versions": schedules.schedule_versions(obj),
        **_slots_context(obj),
    }


def _slots_context(obj: PeriodicTask) -> dict:
    slots = schedule_slots.schedule_slots(obj)
    return {"slots": slots, "slot_problems": schedule_slots.problem_count(slots)}


def _restore_view(model_admin: ScheduleAdmin, request: HttpRequest, object_id: str, version_id):
    """Restore one version (POST); the service checks the permissions and audits."""
    schedule = get_object_or_404(PeriodicTask, pk=object_id if object_id.isdigit() else None)
    if not model_admin.has_view_permission(request, schedule):
        raise PermissionDenied("You may not see schedules.")
    try:
        services.schedule_restore(
            schedule_id=schedule.pk,
            version_id=int(version_id) if version_id.isdigit() else None,
            user=request.user,
        )
    except services.ActionError as exc:
        model_admin.message_user(request, str(exc), messages.ERROR)
    else:
        model_admin.message_user(
            request, f"Restored “{schedule.name}” as a new version.", messages.SUCCESS
        )
    return HttpResponseRedirect(
        reverse("admin:django_celery_beat_periodictask_change", args=[schedule.pk]) + "#versions"
    )


def _run_now_view(model_admin: ScheduleAdmin, request: HttpRequest, object_id: str):
    if not model_admin.has_run_permission(request):
        raise PermissionDenied("You may not run schedules.")
    schedule = get_object_or_404(PeriodicTask, pk=object_id if object_id.isdigit() else None)
    model_admin._run_now(request, schedule)
    return HttpResponseRedirect(
        reverse("admin:django_celery_beat_periodictask_change", args=[schedule.pk])
    )


def _params_view(model_admin: ScheduleAdmin, request: HttpRequest) -> HttpResponse:
    """The parameter fields (and the queue select, out of band) of the chosen job type."""
    if not (model_admin.has_add_permission(request) or model_admin.has_change_permission(request)):
        raise PermissionDenied("You may not edit schedules.")
    raw = request.GET.get("job_type", "")
    allowed = _catalogued_job_types(request.user)
    job_type = allowed.filter(pk=raw).first() if raw.isdigit() else None
    if job_type is None:
        return render(request, FRAGMENT_TEMPLATE, {"params_form": None})
    form = model_admin.get_form(request)(initial={"job_type": job_type.pk})
    # The getter gives the normalised list; django-stubs type it as the setter's input.
    queue_choices = cast(forms.ChoiceField, form.fields["queue"]).choices
    queue_select = forms.Select(choices=queue_choices).render(  # type: ignore[arg-type]
        "queue", job_type.queue, attrs={"id": "id_queue", "hx-swap-oob": "true"}
    )
    priority_input = forms.NumberInput().render(
        "priority",
        job_type.priority,
        attrs={"id": "id_priority", "min": 0, "max": 9, "hx-swap-oob": "true"},
    )
    context = {
        "params_form": form.params_form,
        "queue_select": queue_select,
        "priority_input": priority_input,
    }
    return render(request, FRAGMENT_TEMPLATE, context)


class PeriodicTaskInline(beat_admin.PeriodicTaskInline):
    """The schedules using an interval, crontab, solar or clocked time: kwargs masked.

    django-celery-beat's inline shows each schedule's raw kwargs, secrets included.
    """

    fields = ("name", "task", "parameters")
    readonly_fields = fields

    @admin.display(description="parameters")
    def parameters(self, obj: PeriodicTask) -> str:
        return _masked_kwargs(obj)


for _model, _admin in {
    ClockedSchedule: beat_admin.ClockedScheduleAdmin,
    CrontabSchedule: beat_admin.CrontabScheduleAdmin,
    SolarSchedule: beat_admin.SolarScheduleAdmin,
    IntervalSchedule: beat_admin.IntervalScheduleAdmin,
}.items():
    admin.site.unregister(_model)
    admin.site.register(_model, type(_admin.__name__, (_admin,), {"inlines": [PeriodicTaskInline]}))
