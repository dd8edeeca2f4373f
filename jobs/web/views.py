"""Pages: history, submit, run detail (live), result download, health check.

Login is required by LoginRequiredMiddleware; the only public URL is /healthz.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_not_required, permission_required
from django.core.exceptions import PermissionDenied, ValidationError
from django.http import FileResponse, Http404, HttpRequest, HttpResponse, QueryDict
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_http_methods, require_POST
from django_htmx.middleware import HtmxDetails

from jobs import routing, selectors, services, specs, workflows
from jobs.forms import SubmitOptionsForm
from jobs.models import AuditAction, JobType
from jobs.selectors import broker
from jobs.selectors import workers as worker_info
from jobs.services import control, fleet
from jobs.services.messages import submit_rate_message, submit_rate_wait
from jobs.web.forms import (
    AutoscaleForm,
    PoolRestartForm,
    RateLimitForm,
    RevokeByNameForm,
    TimeLimitForm,
    WorkerActionForm,
    WorkerControlForm,
)


class HtmxHttpRequest(HttpRequest):
    """A request that passed django-htmx's middleware (its documented type for checkers)."""

    htmx: HtmxDetails


@login_not_required
@require_GET
def healthz(request: HttpRequest) -> HttpResponse:
    return HttpResponse("ok", content_type="text/plain")


@require_GET
def history(request: HtmxHttpRequest) -> HttpResponse:
    job_filter, queryset = selectors.job_list(user=request.user, filters=request.GET)
    try:
        page = selectors.job_page(
            queryset, cursor=request.GET.get("cursor"), size=settings.JOBSITE_PAGE_SIZE
        )
    except ValueError:
        return HttpResponse("Invalid cursor.", status=400)
    params = request.GET.copy()
    params.pop("cursor", None)
    context = {
        "filter": job_filter,
        "page": page,
        "filter_query": params.urlencode(),
        "is_first_page": not request.GET.get("cursor"),
    }
    if request.htmx:
        return render(request, "jobs/partials/history_rows.html", context)
    return render(request, "jobs/history.html", context)


@require_GET
def submit_list(request: HttpRequest) -> HttpResponse:
    job_types = selectors.job_types_runnable(user=request.user)
    return render(request, "jobs/submit_list.html", {"job_types": job_types})


@require_http_methods(["GET", "POST"])
def submit(request: HttpRequest, name: str) -> HttpResponse:
    job_type = get_object_or_404(JobType, name=name)
    spec = specs.get(job_type.name)
    if spec is None:
        raise Http404("This job type is no longer declared in code.")
    refusal = job_type.submit_refusal(request.user)
    if refusal:
        raise PermissionDenied(refusal)

    data = request.POST if request.method == "POST" else None
    form = spec.form(data=data)
    options_form = SubmitOptionsForm(data=data, job_type=job_type)
    wait = _submit_wait(request, form)
    if request.method == "POST" and not wait and form.is_valid() and options_form.is_valid():
        params = specs.to_json(form.cleaned_data)
        try:
            job = services.job_submit(
                job_type=job_type,
                params=params,
                user=request.user,
                options=options_form.cleaned_data,
            )
        except ValidationError as exc:
            form.add_error(None, exc)
        else:
            if job.sent_at is None:
                messages.warning(
                    request,
                    "Queued, waiting for the broker: it will be sent when the broker is back.",
                )
            else:
                messages.success(request, f"Submitted “{job_type}”.")
            return redirect(job)
    context = {"job_type": job_type, "form": form, "options_form": options_form}
    return _form_page(request, "jobs/submit.html", context, wait)


def _submit_wait(request: HttpRequest, form) -> int | None:
    """A POST counts against the user's submit rate; over it, the form says so."""
    wait = submit_rate_wait(user=request.user) if request.method == "POST" else None
    if wait:
        form.add_error(None, submit_rate_message(wait))
    return wait


def _form_page(request: HttpRequest, template: str, context: dict, wait: int | None):
    """The form again: 429 with Retry-After when throttled, 400 after a refused POST."""
    status = 429 if wait else 400 if request.method == "POST" else 200
    response = render(request, template, context, status=status)
    if wait:
        response["Retry-After"] = str(wait)
    return response


@require_GET
def detail(request: HtmxHttpRequest, job_id: str) -> HttpResponse:
    job = selectors.job_get(user=request.user, job_id=job_id)
    context = {
        "job": job,
        "params": selectors.job_params_display(job),
        "timeline": selectors.job_timeline(job),
        "logs": selectors.job_logs(job=job),
        "children": selectors.job_children(job=job, user=request.user),
        "actions": selectors.job_actions(user=request.user, job=job),
        "audit": selectors.job_audit(job=job),
    }
    template = "jobs/partials/detail_live.html" if request.htmx else "jobs/detail.html"
    return render(request, template, context)


@require_GET
def download(request: HttpRequest, job_id: str) -> FileResponse:
    job = selectors.job_get(user=request.user, job_id=job_id)
    if not job.result_file:
        raise Http404("This run has no result file.")
    root = Path(settings.MEDIA_ROOT).resolve()
    path = (root / job.result_file).resolve()
    if root not in path.parents or not path.is_file():
        raise Http404("The result file is gone.")
    return FileResponse(path.open("rb"), as_attachment=True, filename=path.name)


# --- Run actions ------------------------------------------------------------------

RUN_ACTIONS: dict[str, tuple[Callable[..., Any], str]] = {
    "cancel": (services.job_cancel, "Cancelled."),
    "terminate": (services.job_terminate, "Termination requested (SIGTERM, then SIGKILL)."),
    "retry": (services.job_retry, "Retried as a new run."),
    "delete": (services.job_delete, "Deleted."),
}


@require_POST
def run_action(request: HttpRequest, job_id: str, action: str) -> HttpResponse:
    job = selectors.job_get(user=request.user, job_id=job_id)
    if action not in RUN_ACTIONS:
        raise Http404("No such action.")
    func, done_message = RUN_ACTIONS[action]
    try:
        result = func(job=job, user=request.user)
    except services.ActionError as exc:
        messages.error(request, str(exc))
        return redirect(job)
    messages.success(request, done_message)
    if action == "delete":
        return redirect("jobs-history")
    return redirect(result if action == "retry" else job)


@require_http_methods(["GET", "POST"])
def rerun(request: HttpRequest, job_id: str) -> HttpResponse:
    """The submit form, prefilled with the run's parameters; the new run links back."""
    job = selectors.job_get(user=request.user, job_id=job_id)
    job_type = job.job_type
    spec = job_type.spec if job_type else None
    if spec is None:
        raise Http404("This run's task is not in the catalogue.")
    if not selectors.job_can_control(user=request.user, job=job):
        raise PermissionDenied("You may not rerun this run.")
    data = request.POST if request.method == "POST" else None
    form = spec.form(data=data, initial=spec.mask(job.params))
    options_form = SubmitOptionsForm(data=data, job_type=job_type, initial=_option_initial(job))
    wait = _submit_wait(request, form)
    if request.method == "POST" and not wait and form.is_valid() and options_form.is_valid():
        params = selectors.unmask(spec, specs.to_json(form.cleaned_data), job.params)
        try:
            new = services.job_rerun(
                job=job, user=request.user, params=params, options=options_form.cleaned_data
            )
        except ValidationError as exc:
            form.add_error(None, exc)
        else:
            messages.success(request, "Rerun submitted.")
            return redirect(new)
    context = {"job_type": job_type, "form": form, "options_form": options_form, "rerun_of": job}
    return _form_page(request, "jobs/submit.html", context, wait)


def _option_initial(job) -> dict:
    return {
        key: job.options.get(key)
        for key in ("queue", "priority", "max_retries")
        if job.options.get(key) is not None
    }


# --- Bulk actions -------------------------------------------------------------------

BULK_LIMIT = 1000


@require_POST
def bulk(request: HttpRequest) -> HttpResponse:
    """Step 1 shows what would happen and how many runs; step 2 (confirm) does it."""
    action = request.POST.get("action", "")
    if action not in services.BULK_ACTIONS:
        return HttpResponse("Choose an action: cancel, retry or delete.", status=400)
    scope = request.POST.get("scope", "selected")
    filters = QueryDict(request.POST.get("filter_query", ""))
    confirmed = request.POST.get("confirmed") == "yes"
    if scope == "filter" and not confirmed:
        _, queryset = selectors.job_list(user=request.user, filters=filters)
    else:
        ids = request.POST.getlist("ids")
        queryset = selectors.job_list(user=request.user)[1].filter(pk__in=ids)
    queryset = selectors.jobs_controllable(queryset, user=request.user)
    if queryset is None:
        raise PermissionDenied("You may not act on these runs.")
    jobs = list(queryset.order_by("-created_at", "-id")[: BULK_LIMIT + 1])
    if len(jobs) > BULK_LIMIT:
        messages.error(request, f"More than {BULK_LIMIT} runs match: narrow the filter first.")
        return redirect(_history_url(filters))
    if not jobs:
        messages.error(request, "No runs selected.")
        return redirect(_history_url(filters))
    if not confirmed:
        # The confirmation lists exactly these runs; confirming acts on them, not on
        # whatever matches the filter a moment later.
        context = {
            "action": action,
            "jobs": jobs,
            "scope": scope,
            "filter_query": filters.urlencode(),
        }
        return render(request, "jobs/bulk_confirm.html", context)
    done, errors = services.job_bulk(action=action, jobs=jobs, user=request.user)
    messages.success(request, f"{action.capitalize()}: {done} of {len(jobs)} runs.")
    for error in errors[:10]:
        messages.warning(request, error)
    return redirect(_history_url(filters))


def _history_url(filters: QueryDict) -> str:
    query = filters.urlencode()
    return reverse("jobs-history") + (f"?{query}" if query else "")


# --- Workers and queues -------------------------------------------------------------


@permission_required("jobs.manage_workers", raise_exception=True)
@require_GET
def workers(request: HtmxHttpRequest) -> HttpResponse:
    return _workers_page(request)


def _workers_page(request: HtmxHttpRequest, status: int = 200) -> HttpResponse:
    found = worker_info.workers_inspect_cached()
    app_tasks = fleet.task_names_controllable()
    context = {
        # Each card offers the tasks its worker has (another codebase's worker: its own).
        "workers": [(w, fleet.worker_task_names(w) if w.registered else app_tasks) for w in found],
        "queues": routing.ALL_QUEUE_NAMES,
    }
    template = "jobs/partials/workers_table.html" if request.htmx else "jobs/workers.html"
    return render(request, template, context, status=status)


@permission_required("jobs.manage_workers", raise_exception=True)
@require_POST
def worker_action(request: HttpRequest) -> HttpResponse:
    form = WorkerActionForm(request.POST)
    if not form.is_valid():
        # Plain text (the value as given, never markup): the errors name a choice the
        # request made up, and SecurityMiddleware's nosniff keeps browsers from guessing HTML.
        errors = form.errors.items()
        problems = "; ".join(f"{name}: {' '.join(map(str, msgs))}" for name, msgs in errors)
        return HttpResponse(
            f"Invalid worker action: {problems}", status=400, content_type="text/plain"
        )
    try:
        replies = services.worker_control(user=request.user, **form.cleaned_data)
        worker_info.workers_forget()
    except services.ActionError as exc:
        messages.error(request, str(exc))
    else:
        messages.success(request, f"{form.cleaned_data['action']}: {_summarise(replies)}")
    return redirect("jobs-workers")


# control -> (its form, the service, its audit action, what the page says when done)
WORKER_CONTROLS: dict[str, tuple[type[WorkerControlForm], Callable[..., list], str, str]] = {
    "rate_limit": (
        RateLimitForm, fleet.worker_rate_limit, AuditAction.RATE_LIMIT, "Rate limit changed"
    ),
    "time_limit": (
        TimeLimitForm, fleet.worker_time_limit, AuditAction.TIME_LIMIT,
        "Time limits changed (for the runs it starts from now)",
    ),
    "autoscale": (AutoscaleForm, fleet.worker_autoscale, AuditAction.AUTOSCALE, "Autoscale"),
    "pool_restart": (
        PoolRestartForm, fleet.worker_pool_restart, AuditAction.POOL_RESTART, "Pool restart"
    ),
}  # fmt: skip


@require_POST
def worker_control(request: HtmxHttpRequest, control_name: str) -> HttpResponse:
    """Task rate/time limits, autoscale, pool restart of one worker (Celery's replies shown).

    Permission first (a refusal is audited), then the input: a bad value is a 400 with
    the workers page saying what was wrong, and nothing is sent.
    """
    if control_name not in WORKER_CONTROLS:
        raise Http404("No such worker control.")
    form_class, service, action, done = WORKER_CONTROLS[control_name]
    fleet.worker_control_allowed(
        user=request.user, action=action, worker=request.POST.get("worker", "")
    )
    worker = request.POST.get("worker", "")
    form = form_class(request.POST, task_names=fleet.task_names_controllable(worker or None))
    if not form.is_valid():
        messages.error(request, f"Nothing changed: {_form_problems(form)}")
        return _workers_page(request, status=400)
    try:
        replies = service(user=request.user, **form.cleaned_data)
    except services.ActionError as exc:
        messages.error(request, f"Nothing changed: {exc}")
    else:
        messages.success(request, f"{done}: {_summarise(replies)}")
    worker_info.workers_forget()
    return redirect("jobs-workers")


def _form_problems(form) -> str:
    """Every error of a form on one line, each after its field's label."""
    problems = []
    for name, errors in form.errors.as_data().items():
        text = " ".join(message for error in errors for message in error.messages)
        label = form.fields[name].label if name in form.fields else ""
        problems.append(f"{label}: {text}" if label else text)
    return " ".join(problems)


@permission_required("jobs.manage_workers", raise_exception=True)
@require_GET
def queues(request: HtmxHttpRequest) -> HttpResponse:
    context = {
        "queues": broker.queue_depths(),
        "paused": services.queues_paused(),
        "broker": broker.broker_kind(),
    }
    template = "jobs/partials/queues_table.html" if request.htmx else "jobs/queues.html"
    return render(request, template, context)


QUEUE_ACTIONS = {"pause": True, "resume": False}


@permission_required("jobs.manage_workers", raise_exception=True)
@require_POST
def queue_action(request: HttpRequest, name: str, action: str) -> HttpResponse:
    if name not in routing.ALL_QUEUE_NAMES:
        raise Http404("No such queue.")
    try:
        if action == "purge":
            if request.POST.get("confirm") != name:
                messages.error(request, f"Type the queue name ({name}) to confirm the purge.")
                return redirect("jobs-queues")
            count = services.queue_purge(queue=name, user=request.user)
            messages.success(request, f"Purged {count} message(s) from {name}.")
        elif action in QUEUE_ACTIONS:
            replies = services.queue_set_paused(
                queue=name, paused=QUEUE_ACTIONS[action], user=request.user
            )
            messages.success(request, f"{action.capitalize()} {name}: {_summarise(replies)}")
        else:
            raise Http404("No such action.")
    except services.ActionError as exc:
        messages.error(request, str(exc))
    return redirect("jobs-queues")


# --- Cancel by task name -------------------------------------------------------------


@require_http_methods(["GET", "POST"])
def revoke_by_name(request: HttpRequest) -> HttpResponse:
    """Cancel every unfinished run of one task that the user can see (jobs.control_jobs)."""
    unfinished = selectors.jobs_unfinished_by_task(user=request.user)
    task_names = control.revocable_task_names(user=request.user, unfinished=unfinished)
    if request.method == "POST":
        # Refused before the input is read; the service audits the refusal.
        if not request.user.has_perm("jobs.control_jobs"):
            control.jobs_revoke_by_name(
                task_name=request.POST.get("task_name", ""), user=request.user
            )
        form = RevokeByNameForm(request.POST, task_names=task_names)
        if form.is_valid():
            try:
                done = control.jobs_revoke_by_name(user=request.user, **form.cleaned_data)
            except services.ActionError as exc:
                messages.error(request, str(exc))
            else:
                _revoke_report(request, done)
                return redirect("jobs-revoke-by-name")
    elif not request.user.has_perm("jobs.control_jobs"):
        raise PermissionDenied("You may not cancel runs by task name.")
    else:
        form = RevokeByNameForm(task_names=task_names)
    context = {"form": form, "unfinished": unfinished}
    status = 400 if request.method == "POST" else 200
    return render(request, "jobs/revoke_by_name.html", context, status=status)


def _revoke_report(request: HttpRequest, done: control.RevokeByName) -> None:
    report = f"{done.task_name}: cancelled {len(done.cancelled)} waiting run(s)"
    if done.terminated:
        report += f", terminating {len(done.terminated)} running"
    if done.left_running:
        report += f"; {done.left_running} already running left alone (tick “Also stop”)"
    messages.success(request, report + ".")
    for error in done.errors[:10]:
        messages.warning(request, error)


def _summarise(replies: list) -> str:
    if not replies:
        return "no worker answered."
    return "; ".join(f"{name}: {answer}" for reply in replies for name, answer in reply.items())


# --- Workflows ----------------------------------------------------------------------


@require_GET
def workflow_list(request: HttpRequest) -> HttpResponse:
    templates = selectors.workflow_templates_runnable(user=request.user)
    return render(request, "jobs/workflow_list.html", {"templates": templates})


@require_http_methods(["GET", "POST"])
def workflow_new(request: HttpRequest, name: str) -> HttpResponse:
    template = workflows.get(name)
    if template is None:
        raise Http404("No such workflow.")
    if template not in selectors.workflow_templates_runnable(user=request.user):
        raise PermissionDenied(f"You may not run every step of “{template.title}”.")
    form = template.form(data=request.POST if request.method == "POST" else None)
    wait = _submit_wait(request, form)
    if request.method == "POST" and not wait and form.is_valid():
        try:
            root = services.workflow_submit(
                workflow=template.name, params=form.cleaned_data, user=request.user
            )
        except ValidationError as exc:
            form.add_error(None, exc)
        else:
            messages.success(request, f"Started “{template.title}”.")
            return redirect("jobs-workflow", root.pk)
    context = {"template": template, "form": form}
    return _form_page(request, "jobs/workflow_new.html", context, wait)


@require_GET
def workflow_detail(request: HtmxHttpRequest, workflow_id: str) -> HttpResponse:
    root = selectors.job_get(user=request.user, job_id=workflow_id)
    wf = selectors.workflow_tree(job=root, user=request.user)
    if wf is None or wf["root"].pk != root.pk:
        raise Http404("No such workflow.")
    context = {"wf": wf, "can_cancel": selectors.job_can_control(user=request.user, job=root)}
    template = "jobs/partials/workflow_live.html" if request.htmx else "jobs/workflow_detail.html"
    return render(request, template, context)


@require_POST
def workflow_cancel(request: HttpRequest, workflow_id: str) -> HttpResponse:
    root = selectors.job_get(user=request.user, job_id=workflow_id)
    if not root.options.get("workflow", {}).get("plan"):
        raise Http404("No such workflow.")
    cancelled, errors = services.workflow_cancel(root=root, user=request.user)
    messages.success(request, f"Cancelled {len(cancelled)} step(s).")
    for error in errors[:10]:
        messages.warning(request, error)
    return redirect("jobs-workflow", root.pk)
