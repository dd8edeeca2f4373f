"""The JSON API: runs (list, detail, submit, cancel, retry), job types, schedules.

Thin views over the same selectors and services as the pages. Authentication is a
personal token (jobs/api_auth.py) or the browser session (with CSRF); an anonymous
request gets a JSON 401, never a redirect to the login page.

Errors are JSON: 400 ``{field: [messages]}`` for bad input, otherwise
``{"detail": message}`` with 401, 403, 404 (an unknown job type or a run you may not
see), 409 (the action does not apply to the run now) or 413 (parameters too large).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import NoReturn

from django.conf import settings
from django.core.exceptions import ValidationError
from django.urls import reverse
from django.utils import timezone
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import exceptions, permissions, serializers, status, throttling
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.utils.urls import replace_query_param
from rest_framework.views import APIView

from jobs import selectors, services, specs
from jobs.api.serializers import (
    BulkResultSerializer,
    BulkSubmitSerializer,
    ErrorSerializer,
    JobTypeSerializer,
    RunPageSerializer,
    RunSerializer,
    ScheduleSerializer,
    SubmitSerializer,
)
from jobs.forms import SubmitOptionsForm
from jobs.models import Job, JobSource, JobState, JobType
from jobs.services.messages import submit_rate_message, submit_rate_wait

MAX_PAGE_SIZE = 200


def _error(description: str) -> OpenApiResponse:
    return OpenApiResponse(ErrorSerializer, description=description)


FIELD_ERRORS = OpenApiResponse(
    OpenApiTypes.OBJECT, description="Invalid input: {field: [messages]}"
)
UNAUTHENTICATED = _error("No credentials, or an invalid or revoked token.")
NOT_VISIBLE = _error("No such run, or not one you may see.")


class PageQuery(serializers.Serializer):
    cursor = serializers.CharField(
        required=False, allow_blank=True, help_text="From the previous page's `next`."
    )
    page_size = serializers.IntegerField(required=False, min_value=1, max_value=MAX_PAGE_SIZE)

    def validate(self, attrs: dict) -> dict:
        # DRF skips a blank optional field in a query string; the schema says integer,
        # so `?page_size=` is refused rather than read as the default.
        if self.initial_data.get("page_size") == "":
            raise serializers.ValidationError({"page_size": ["A valid integer is required."]})
        return attrs


# As on the history page, an empty value means "any". The times are strings because
# Django's date-time parsing accepts more than RFC 3339 (a date alone, a space for "T").
WHEN = "ISO 8601 date-time, e.g. 2024-05-01T12:00:00Z (a date alone means midnight)."
RUN_FILTERS = [
    OpenApiParameter("state", str, enum=["", *JobState.values]),
    OpenApiParameter("job_type", str, description="A job type name."),
    OpenApiParameter("queue", str),
    OpenApiParameter("submitted_by", str, description="A username."),
    OpenApiParameter("schedule", str, description="A schedule's name."),
    OpenApiParameter("submitted_after", str, description=f"From this time on. {WHEN}"),
    OpenApiParameter("submitted_before", str, description=f"Before this time. {WHEN}"),
    OpenApiParameter("q", str, description="A run id prefix, or text in parameters or errors."),
]


# --- Runs ---------------------------------------------------------------------------


class SubmitThrottle(throttling.BaseThrottle):
    """POSTs count against the user's JOBSITE_SUBMIT_RATE (shared with the web form).

    A bulk request counts once, like a single submit: its 1,000 items at most bound it.
    """

    def allow_request(self, request, view) -> bool:
        self.retry_after = None
        if request.method == "POST":
            self.retry_after = submit_rate_wait(user=request.user)
        return self.retry_after is None

    def wait(self) -> float | None:
        return self.retry_after


class SubmitThrottled(exceptions.Throttled):
    def __init__(self, wait: float) -> None:
        super().__init__(wait, detail=submit_rate_message(math.ceil(wait)))


THROTTLED = _error(
    "Over JOBSITE_SUBMIT_RATE: the Retry-After header says in how many seconds to try again."
)


class SubmitAPIView(APIView):
    """A view whose POSTs submit runs: throttled, with Jobsite's message."""

    throttle_classes: Sequence[type[throttling.BaseThrottle]] = [SubmitThrottle]

    def throttled(self, request: Request, wait: float) -> NoReturn:
        raise SubmitThrottled(wait)


class RunListView(SubmitAPIView):
    @extend_schema(
        operation_id="runs_list",
        summary="Runs you may see, newest first",
        description="Cursor-paginated (no counts): follow `next` until it is null. "
        "The filters are the history page's.",
        parameters=[PageQuery, *RUN_FILTERS],
        responses={200: RunPageSerializer, 400: FIELD_ERRORS, 401: UNAUTHENTICATED},
    )
    def get(self, request: Request) -> Response:
        query = PageQuery(data=request.query_params)
        query.is_valid(raise_exception=True)
        job_filter, queryset = selectors.job_list(user=request.user, filters=request.query_params)
        if not job_filter.is_valid():
            raise exceptions.ValidationError(job_filter.errors)
        size = query.validated_data.get("page_size", _default_page_size())
        try:
            page = selectors.job_page(
                queryset, cursor=query.validated_data.get("cursor"), size=size
            )
        except ValueError:
            raise exceptions.ValidationError({"cursor": ["Invalid cursor."]}) from None
        next_url = None
        if page.next_cursor:
            next_url = replace_query_param(request.build_absolute_uri(), "cursor", page.next_cursor)
        runs = RunSerializer(page.rows, many=True, context={"request": request}).data
        return Response({"results": runs, "next": next_url})

    @extend_schema(
        operation_id="runs_submit",
        summary="Submit a run",
        description="Parameters are checked by the job type's form, options as on the "
        "submit page. With an idempotency key already used, the existing run is "
        "returned with 200.",
        request=SubmitSerializer,
        responses={
            201: OpenApiResponse(RunSerializer, description="Stored, and sent to the broker."),
            200: OpenApiResponse(RunSerializer, description="The run with this idempotency key."),
            400: OpenApiResponse(
                OpenApiTypes.OBJECT,
                description='Invalid input: {"params": {field: [messages]}, "options": {...}}',
            ),
            401: UNAUTHENTICATED,
            403: _error("The job type is internal or disabled, or you may not run it."),
            404: _error("No job type by that name."),
            413: _error("The parameters are larger than JOBSITE_MAX_PARAMS_BYTES."),
            429: THROTTLED,
        },
    )
    def post(self, request: Request) -> Response:
        body = SubmitSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        job_type = _runnable_job_type(body.validated_data["job_type"], request.user)
        params, param_errors = _clean_params(job_type, body.validated_data["params"])
        options, option_errors = _clean_options(job_type, body.validated_data["options"])
        errors = {"params": param_errors, "options": option_errors}
        if param_errors or option_errors:
            raise exceptions.ValidationError({k: v for k, v in errors.items() if v})
        assert params is not None  # _clean_params gives params or errors
        # A run created before this request is the one its idempotency key named.
        started = timezone.now()
        try:
            job = services.job_submit(
                job_type=job_type,
                params=params,
                user=request.user,
                options=options,
                source=JobSource.API,
            )
        except ValidationError as exc:
            code = status.HTTP_413_REQUEST_ENTITY_TOO_LARGE if exc.code == "too_large" else 400
            return Response({"detail": " ".join(exc.messages)}, status=code)
        created = job.created_at >= started
        return _run_response(request, job, status.HTTP_201_CREATED if created else 200)


class RunBulkView(SubmitAPIView):
    @extend_schema(
        operation_id="runs_submit_bulk",
        summary="Submit many runs at once",
        description="Up to 1,000 submits, each validated as by `POST /api/runs/` "
        "(idempotency keys are not accepted here). All or nothing: when any item is "
        "refused, nothing is stored and the 400 lists every refused item by its index: "
        '`{"runs": {"3": {"params": {"limit": ["..."]}}, "7": {"job_type": ["..."]}}}` '
        "(an unknown job type, one you may not run or a disabled one, invalid "
        "parameters or options, parameters over JOBSITE_MAX_PARAMS_BYTES).",
        request=BulkSubmitSerializer,
        responses={
            201: OpenApiResponse(BulkResultSerializer, description="All stored and sent."),
            400: OpenApiResponse(
                OpenApiTypes.OBJECT,
                description='{"runs": {index: {field: [messages]}}}, or {"runs": [message]} '
                "for an empty or too long list. Nothing was stored.",
            ),
            401: UNAUTHENTICATED,
            429: THROTTLED,
        },
    )
    def post(self, request: Request) -> Response:
        body = BulkSubmitSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        items, errors = _bulk_items(body.validated_data["runs"])
        if not errors:
            try:
                jobs = services.job_submit_many(items=items, user=request.user)
            except services.BulkSubmitError as exc:
                errors = exc.errors
        if errors:
            raise exceptions.ValidationError({"runs": {str(i): e for i, e in errors.items()}})
        runs = [
            {
                "id": job.pk,
                "url": request.build_absolute_uri(reverse("api-run-detail", args=[job.pk])),
                "state": job.state,
                "sent": job.sent_at is not None,
            }
            for job in jobs
        ]
        return Response({"runs": runs}, status=status.HTTP_201_CREATED)


def _bulk_items(runs: list[dict]) -> tuple[list, dict[int, dict]]:
    """(job type, params, options) per item, or the errors of each refused item."""
    names = {run["job_type"] for run in runs}
    job_types = {jt.name: jt for jt in JobType.objects.filter(name__in=names) if specs.get(jt.name)}
    items, errors = [], {}
    # Many items share their options (often none) or even their parameters: validate
    # each distinct (job type, value) once; form validation is most of a submit's cost.
    cleaned: dict[tuple, tuple] = {}

    def clean(func, job_type, given: dict) -> tuple:
        key = (func, job_type.pk, json.dumps(given, sort_keys=True, default=str))
        if key not in cleaned:
            cleaned[key] = func(job_type, given)
        value, found = cleaned[key]
        return (dict(value) if value is not None else None), found

    for index, run in enumerate(runs):
        job_type = job_types.get(run["job_type"])
        if job_type is None:
            errors[index] = {"job_type": [f"No job type named “{run['job_type']}”."]}
            continue
        params, param_errors = clean(_clean_params, job_type, run["params"])
        options, option_errors = clean(_clean_options, job_type, run["options"])
        found = {"params": param_errors, "options": option_errors}
        if param_errors or option_errors:
            errors[index] = {k: v for k, v in found.items() if v}
        else:
            items.append((job_type, params, options))
    return items, errors


class RunDetailView(APIView):
    @extend_schema(
        operation_id="runs_retrieve",
        summary="One run",
        responses={200: RunSerializer, 401: UNAUTHENTICATED, 404: NOT_VISIBLE},
    )
    def get(self, request: Request, job_id: str) -> Response:
        return _run_response(request, _visible_run(request, job_id))


ACTION_RESPONSES = {
    401: UNAUTHENTICATED,
    403: _error("You may not control this run."),
    404: NOT_VISIBLE,
    409: _error("The action does not apply to the run in its current state."),
}


class RunCancelView(APIView):
    @extend_schema(
        operation_id="runs_cancel",
        summary="Cancel a run that has not started",
        request=None,
        responses={200: RunSerializer, **ACTION_RESPONSES},
    )
    def post(self, request: Request, job_id: str) -> Response:
        job = _visible_run(request, job_id)
        try:
            job = services.job_cancel(job=job, user=request.user)
        except services.ActionError as exc:
            return _conflict(exc)
        return _run_response(request, job)


class RunRetryView(APIView):
    @extend_schema(
        operation_id="runs_retry",
        summary="Retry a failed, cancelled or lost run",
        description="A new run with the same parameters and options, linked to this one.",
        request=None,
        responses={201: RunSerializer, **ACTION_RESPONSES},
    )
    def post(self, request: Request, job_id: str) -> Response:
        job = _visible_run(request, job_id)
        try:
            new = services.job_retry(job=job, user=request.user)
        except services.ActionError as exc:
            return _conflict(exc)
        return _run_response(request, new, status.HTTP_201_CREATED)


# --- Job types and schedules ----------------------------------------------------------


class JobTypeListView(APIView):
    @extend_schema(
        operation_id="job_types_list",
        summary="Job types you may run",
        description="Each with JSON Schemas of its parameters and of the submit options.",
        responses={200: JobTypeSerializer(many=True), 401: UNAUTHENTICATED},
    )
    def get(self, request: Request) -> Response:
        job_types = selectors.job_types_runnable(user=request.user)
        return Response(JobTypeSerializer(job_types, many=True).data)


class CanViewSchedules(permissions.BasePermission):
    message = "You may not see schedules (needs django_celery_beat.view_periodictask)."

    def has_permission(self, request, view) -> bool:
        user = request.user
        return bool(user.is_staff or user.has_perm("django_celery_beat.view_periodictask"))


class ScheduleListView(APIView):
    permission_classes = [permissions.IsAuthenticated, CanViewSchedules]

    @extend_schema(
        operation_id="schedules_list",
        summary="Periodic schedules (django-celery-beat)",
        description="Secret parameters in the kwargs are masked. Staff without "
        "`django_celery_beat.view_periodictask` see only the schedules of job types they "
        "may run.",
        responses={
            200: ScheduleSerializer(many=True),
            401: UNAUTHENTICATED,
            403: _error("You may not see schedules."),
        },
    )
    def get(self, request: Request) -> Response:
        schedules = selectors.periodic_task_list(user=request.user)
        return Response(ScheduleSerializer(schedules, many=True).data)


# --- Helpers --------------------------------------------------------------------------


def _default_page_size() -> int:
    return min(settings.JOBSITE_PAGE_SIZE, MAX_PAGE_SIZE)


def _visible_run(request: Request, job_id: str) -> Job:
    # PostgreSQL text cannot hold NUL: such an id names no run.
    if "\x00" in job_id:
        raise exceptions.NotFound("No such run.")
    return selectors.job_get(user=request.user, job_id=job_id)


def _runnable_job_type(name: str, user) -> JobType:
    job_type = JobType.objects.filter(name=name).first()
    if job_type is None or specs.get(name) is None:
        raise exceptions.NotFound(f"No job type named “{name}”.")
    refusal = job_type.submit_refusal(user)
    if refusal:
        raise exceptions.PermissionDenied(refusal)
    return job_type


def _clean_params(job_type: JobType, given: dict) -> tuple[dict | None, dict]:
    spec = job_type.spec
    data, errors = _form_data(given, spec.form.base_fields)
    if errors:
        return None, errors
    return spec.clean_params(data)


def _clean_options(job_type: JobType, given: dict) -> tuple[dict | None, dict]:
    form = SubmitOptionsForm(job_type=job_type, prefix=None)
    # Like the submit page, start from the job type's defaults.
    defaults = {name: f.initial for name, f in form.fields.items() if f.initial is not None}
    data, errors = _form_data(given, form.fields)
    if errors:
        return None, errors
    form = SubmitOptionsForm(data={**defaults, **data}, job_type=job_type, prefix=None)
    if not form.is_valid():
        return None, {name: list(messages) for name, messages in form.errors.items()}
    return form.cleaned_data, {}


def _form_data(given: dict, fields) -> tuple[dict, dict]:
    """JSON values as a browser would post them (text); unknown or nested values are errors.

    Forms expect text: a number or an object reaching a date field would crash it.
    """
    data, errors = {}, {}
    for name, value in given.items():
        if name not in fields:
            errors[name] = ["Unknown field."]
        elif isinstance(value, dict | list):
            errors[name] = ["Expected a string, a number or a boolean."]
        elif value is not None:
            data[name] = str(value)
    return data, errors


def _run_response(request: Request, job: Job, code: int = status.HTTP_200_OK) -> Response:
    return Response(RunSerializer(job, context={"request": request}).data, status=code)


def _conflict(exc: Exception) -> Response:
    return Response({"detail": str(exc)}, status=status.HTTP_409_CONFLICT)
