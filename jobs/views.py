"""Pages: history, submit, run detail (live), result download, health check.

Login is required by LoginRequiredMiddleware; the only public URL is /healthz.
"""

from __future__ import annotations

from pathlib import Path

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_not_required
from django.core.exceptions import PermissionDenied, ValidationError
from django.http import FileResponse, Http404, HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_GET, require_http_methods

from jobs import catalog, selectors, services
from jobs.forms import SubmitOptionsForm
from jobs.models import JobType


@login_not_required
@require_GET
def healthz(request: HttpRequest) -> HttpResponse:
    return HttpResponse("ok", content_type="text/plain")


@require_GET
def history(request: HttpRequest) -> HttpResponse:
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
    spec = catalog.get(job_type.name)
    if spec is None:
        raise Http404("This job type is no longer declared in code.")
    if not job_type.enabled:
        raise PermissionDenied(f"“{job_type}” is disabled.")
    if not job_type.is_runnable_by(request.user):
        raise PermissionDenied(f"You may not run “{job_type}”.")

    data = request.POST if request.method == "POST" else None
    form = spec.form(data=data)
    options_form = SubmitOptionsForm(data=data, job_type=job_type)
    if request.method == "POST" and form.is_valid() and options_form.is_valid():
        params = catalog.to_json(form.cleaned_data)
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
    status = 400 if request.method == "POST" else 200
    context = {"job_type": job_type, "form": form, "options_form": options_form}
    return render(request, "jobs/submit.html", context, status=status)


@require_GET
def detail(request: HttpRequest, job_id: str) -> HttpResponse:
    job = selectors.job_get(user=request.user, job_id=job_id)
    context = {
        "job": job,
        "timeline": selectors.job_timeline(job),
        "logs": selectors.job_logs(job=job),
        "children": selectors.job_children(job=job, user=request.user),
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
