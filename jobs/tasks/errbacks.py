"""The workflows' errback: always declared, since any workflow (the demo ones or a
project's own, registered with jobs.workflows.register) links it to its steps."""

from __future__ import annotations

from django import forms

from jobs import catalog
from jobs.services import workflow_record_failure


class WorkflowFailedParams(forms.Form):
    workflow_id = forms.CharField(label="Workflow", max_length=255)


@catalog.job(
    name="jobs.workflow_failed",
    form=WorkflowFailedParams,
    title="Workflow failed (errback)",
    description="Runs when a workflow step fails: records which step failed and marks "
    "the steps that can no longer run.",
    queue="default",
    internal=True,  # its workflow id is someone's workflow: only Jobsite sends it
)
def workflow_failed(self, failed_task_id: str | None = None, *, workflow_id: str) -> dict:
    return workflow_record_failure(
        workflow_id=workflow_id, failed_task_id=failed_task_id, errback_id=self.request.id
    )
