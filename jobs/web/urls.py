from django.urls import path

from jobs.web import account, dashboard, metrics, views

urlpatterns = [
    path("", dashboard.dashboard, name="jobs-dashboard"),
    path("dashboard/summary/", dashboard.dashboard_summary, name="jobs-dashboard-summary"),
    path("dashboard/system/", dashboard.dashboard_system, name="jobs-dashboard-system"),
    path("dashboard/data.json", dashboard.dashboard_data, name="jobs-dashboard-data"),
    path("metrics", metrics.metrics_view, name="jobs-metrics"),
    path("runs/", views.history, name="jobs-history"),
    path("submit/", views.submit_list, name="jobs-submit-list"),
    path("submit/<slug:name>/", views.submit, name="jobs-submit"),
    path("runs/<runid:job_id>/", views.detail, name="jobs-detail"),
    path("runs/<runid:job_id>/file", views.download, name="jobs-download"),
    path("runs/<runid:job_id>/rerun/", views.rerun, name="jobs-rerun"),
    path(
        "runs/<runid:job_id>/<slug:action>",
        views.run_action,
        name="jobs-action",
    ),
    path("bulk/", views.bulk, name="jobs-bulk"),
    path("workers/", views.workers, name="jobs-workers"),
    path("workers/action", views.worker_action, name="jobs-worker-action"),
    path("workers/control/<slug:control_name>", views.worker_control, name="jobs-worker-control"),
    path("cancel-by-task/", views.revoke_by_name, name="jobs-revoke-by-name"),
    path("queues/", views.queues, name="jobs-queues"),
    path("queues/<slug:name>/<slug:action>", views.queue_action, name="jobs-queue-action"),
    path("workflows/new/", views.workflow_list, name="jobs-workflow-list"),
    path("workflows/new/<slug:name>/", views.workflow_new, name="jobs-workflow-new"),
    path("workflows/<runid:workflow_id>/", views.workflow_detail, name="jobs-workflow"),
    path(
        "workflows/<runid:workflow_id>/cancel", views.workflow_cancel, name="jobs-workflow-cancel"
    ),
    path("account/tokens/", account.tokens, name="account-tokens"),
    path("account/tokens/<int:token_id>/revoke", account.token_revoke, name="account-token-revoke"),
]
