"""Every read Jobsite's pages and API make; no writes.

run reads (runs), figures (stats), schedule reads (schedules), the broker's queues
(broker) and live workers (workers). Run reads are re-exported here.
"""

from __future__ import annotations

from jobs.selectors.runs import (
    JobFilter,
    Page,
    api_token_get,
    api_token_list,
    decode_cursor,
    encode_cursor,
    job_actions,
    job_audit,
    job_can_control,
    job_children,
    job_get,
    job_list,
    job_logs,
    job_page,
    job_params_display,
    job_timeline,
    job_types_runnable,
    jobs_controllable,
    jobs_unfinished_by_task,
    periodic_task_list,
    unmask,
    workflow_templates_runnable,
    workflow_tree,
)

__all__ = [
    "JobFilter",
    "Page",
    "api_token_get",
    "api_token_list",
    "decode_cursor",
    "encode_cursor",
    "job_actions",
    "job_audit",
    "job_can_control",
    "job_children",
    "job_get",
    "job_list",
    "job_logs",
    "job_page",
    "job_params_display",
    "job_timeline",
    "job_types_runnable",
    "jobs_controllable",
    "jobs_unfinished_by_task",
    "periodic_task_list",
    "unmask",
    "workflow_templates_runnable",
    "workflow_tree",
]
