"""The API's JSON shapes: runs, submissions, job types, schedules, errors.

Validation of what a run may be given stays in the job type's form and
SubmitOptionsForm (the same as the web pages); these serializers only shape JSON.
Secret parameters are masked (``JobSpec.mask``) wherever parameters are output.
"""

from __future__ import annotations

import json
from typing import Any

from django.urls import reverse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiExample, extend_schema_field, extend_schema_serializer
from rest_framework import serializers

from jobs import specs
from jobs.api.form_schema import form_json_schema
from jobs.forms import SubmitOptionsForm
from jobs.models import Job, JobSource, JobState, JobType


def masked(job_type_name: str | None, params: dict) -> dict:
    spec = specs.get(job_type_name) if job_type_name else None
    return spec.mask(params) if spec else params


# --- Runs -------------------------------------------------------------------------


class ProgressSerializer(serializers.Serializer):
    current = serializers.IntegerField(allow_null=True)
    total = serializers.IntegerField(allow_null=True)
    percent = serializers.IntegerField(allow_null=True)
    message = serializers.CharField()


class RunSerializer(serializers.ModelSerializer):
    """One run, as stored; parameters with secret fields masked."""

    url = serializers.SerializerMethodField()
    web_url = serializers.SerializerMethodField()
    job_type: serializers.SlugRelatedField[JobType] = serializers.SlugRelatedField(
        slug_field="name", read_only=True, allow_null=True
    )
    state = serializers.ChoiceField(choices=JobState.choices, read_only=True)
    # The serializer's metaclass takes declared fields off the class, so this field does
    # not replace Field.source; the stubs cannot tell.
    source = serializers.ChoiceField(choices=JobSource.choices, read_only=True)  # type: ignore[assignment]
    submitted_by: serializers.SlugRelatedField[Any] = serializers.SlugRelatedField(
        slug_field="username", read_only=True, allow_null=True
    )
    params = serializers.SerializerMethodField()
    options = serializers.JSONField(read_only=True)
    progress = serializers.SerializerMethodField()
    result = serializers.JSONField(read_only=True, allow_null=True)
    result_file_url = serializers.SerializerMethodField()
    executions_note = serializers.CharField(
        read_only=True,
        help_text="Set when the run executed more times than it was attempted: a worker "
        "died while running it and it ran again (at least once after a crash).",
    )

    class Meta:
        model = Job
        fields = [
            "id", "url", "web_url", "job_type", "task_name", "state", "source",
            "submitted_by", "schedule_name", "parent", "workflow_id", "queue", "priority",
            "idempotency_key", "params", "options", "created_at", "sent_at", "eta",
            "expires_at", "received_at", "started_at", "finished_at", "worker", "retries",
            "retry_history", "executions", "executions_note", "progress", "result",
            "result_file_url", "exception_type", "error_message", "traceback",
        ]  # fmt: skip
        read_only_fields = fields

    def get_url(self, job: Job) -> str:
        return self._absolute(reverse("api-run-detail", args=[job.pk]))

    def get_web_url(self, job: Job) -> str:
        return self._absolute(job.get_absolute_url())

    @extend_schema_field(OpenApiTypes.OBJECT)
    def get_params(self, job: Job) -> dict:
        return masked(job.job_type.name if job.job_type else None, job.params)

    @extend_schema_field(ProgressSerializer)
    def get_progress(self, job: Job) -> dict:
        return {
            "current": job.progress_current,
            "total": job.progress_total,
            "percent": job.progress_percent,
            "message": job.progress_message,
        }

    @extend_schema_field(serializers.URLField(allow_null=True))
    def get_result_file_url(self, job: Job) -> str | None:
        if not job.result_file:
            return None
        return self._absolute(reverse("jobs-download", args=[job.pk]))

    def _absolute(self, path: str) -> str:
        request = self.context.get("request")
        return request.build_absolute_uri(path) if request else path


class RunPageSerializer(serializers.Serializer):
    results = RunSerializer(many=True)
    next = serializers.URLField(
        allow_null=True, help_text="The next (older) page; null on the last page."
    )


class SubmitOptionsSerializer(serializers.Serializer):
    """Documentation of the options; SubmitOptionsForm does the validating."""

    queue = serializers.CharField(
        required=False, help_text="One of the job type's queues (see /api/job-types/)."
    )
    priority = serializers.IntegerField(required=False, min_value=0, max_value=9)
    countdown = serializers.IntegerField(required=False, min_value=0, max_value=30 * 86_400)
    run_at = serializers.DateTimeField(required=False, help_text="Overrides the countdown.")
    expires = serializers.IntegerField(required=False, min_value=1, max_value=30 * 86_400)
    max_retries = serializers.IntegerField(required=False, min_value=0, max_value=50)
    idempotency_key = serializers.CharField(
        required=False,
        max_length=200,
        help_text="Submitting again with the same key returns the existing run (200).",
    )


@extend_schema_field(SubmitOptionsSerializer)
class OptionsField(serializers.DictField):
    """A plain object, so that SubmitOptionsForm reports option errors as the web form does;
    the schema shows the options with their types."""


@extend_schema_serializer(
    examples=[
        OpenApiExample(
            "Count primes on the cpu queue",
            value={
                "job_type": "count_primes",
                "params": {"limit": 1000000},
                "options": {"queue": "cpu", "priority": 7},
            },
            request_only=True,
        )
    ]
)
class SubmitSerializer(serializers.Serializer):
    job_type = serializers.SlugField(max_length=100, help_text="A name from /api/job-types/.")
    params = serializers.DictField(
        required=False,
        default=dict,
        help_text="The job type's parameters, as described by its params_schema.",
    )
    options = OptionsField(
        required=False, default=dict, help_text="Optional; the job type's defaults otherwise."
    )


# --- Job types and schedules ----------------------------------------------------------


class JobTypeSerializer(serializers.Serializer):
    name = serializers.CharField()
    title = serializers.CharField()
    description = serializers.CharField()
    queue = serializers.CharField()
    queues = serializers.SerializerMethodField()
    priority = serializers.IntegerField()
    max_retries = serializers.IntegerField()
    countdown = serializers.IntegerField()
    expires = serializers.IntegerField(allow_null=True)
    params_schema = serializers.SerializerMethodField()
    options_schema = serializers.SerializerMethodField()

    @extend_schema_field(serializers.ListField(child=serializers.CharField()))
    def get_queues(self, job_type) -> list[str]:
        return list(job_type.spec.queues)

    @extend_schema_field(OpenApiTypes.OBJECT)
    def get_params_schema(self, job_type) -> dict:
        return form_json_schema(job_type.spec.form())

    @extend_schema_field(OpenApiTypes.OBJECT)
    def get_options_schema(self, job_type) -> dict:
        return form_json_schema(SubmitOptionsForm(job_type=job_type, prefix=None))


class ScheduleSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    name = serializers.CharField()
    task = serializers.CharField(help_text="The Celery task it sends.")
    job_type = serializers.SerializerMethodField()
    enabled = serializers.BooleanField()
    one_off = serializers.BooleanField()
    schedule = serializers.SerializerMethodField()
    kwargs = serializers.SerializerMethodField()
    queue = serializers.CharField(allow_null=True)
    last_run_at = serializers.DateTimeField(allow_null=True)
    total_run_count = serializers.IntegerField()
    description = serializers.CharField()

    @extend_schema_field(serializers.CharField(allow_null=True))
    def get_job_type(self, task) -> str | None:
        spec = specs.by_task_name(task.task)
        return spec.name if spec else None

    def get_schedule(self, task) -> str:
        return str(task.interval or task.crontab or task.solar or task.clocked or "")

    @extend_schema_field(OpenApiTypes.OBJECT)
    def get_kwargs(self, task) -> dict:
        try:
            kwargs = json.loads(task.kwargs or "{}")
        except ValueError:
            return {}
        if not isinstance(kwargs, dict):
            return {}
        spec = specs.by_task_name(task.task)
        return spec.mask(kwargs) if spec else kwargs


# --- Errors ---------------------------------------------------------------------------


class ErrorSerializer(serializers.Serializer):
    detail = serializers.CharField()


# --- Bulk submit ----------------------------------------------------------------------


class BulkSubmitSerializer(serializers.Serializer):
    runs = serializers.ListField(
        child=SubmitSerializer(),
        min_length=1,
        max_length=1000,  # services.BULK_SUBMIT_MAX
        help_text="Up to 1,000 submits, each as for POST /api/runs/ (no idempotency key).",
    )


class BulkRunSerializer(serializers.Serializer):
    id = serializers.CharField()
    url = serializers.URLField()
    state = serializers.ChoiceField(choices=JobState.choices)
    sent = serializers.BooleanField(
        help_text="False: stored, waiting for the broker (the relay sends it later)."
    )


class BulkResultSerializer(serializers.Serializer):
    runs = BulkRunSerializer(many=True, help_text="In the order submitted.")
