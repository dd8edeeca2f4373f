"""Remote-control commands of Jobsite's workers (registered when the consumer is imported).

``jobsite_time_limit``: Celery's ``time_limit``, then the consumer's task strategies
rebuilt. Celery 5's ``time_limit`` sets the task's limits, but each task's request class
was made when the worker started, with the limits of that moment
(celery.worker.request.create_request_cls), so a prefork worker kept applying the old
ones until its pool restarted. Rebuilding the strategies (``Consumer.update_strategies``,
what the worker does at start) makes the next runs take the new limits. Entry 77 in
docs/internals.md.
"""

from __future__ import annotations

import logging

from celery.worker import control as celery_control
from celery.worker.control import control_command

logger = logging.getLogger(__name__)


@control_command(
    args=[("task_name", str), ("soft", float), ("hard", float)],
    signature="<task_name> <soft_secs> [hard_secs]",
)
def jobsite_time_limit(state, task_name=None, hard=None, soft=None, **kwargs):
    """Tell the worker to change a task's time limits, for its next runs too."""
    # Not in the stubs (celery-types).
    reply = celery_control.time_limit(  # type: ignore[attr-defined]
        state, task_name=task_name, hard=hard, soft=soft, **kwargs
    )
    if "ok" in reply:
        state.consumer.update_strategies()
        logger.info("Task strategies rebuilt: %s takes soft=%s hard=%s from now", task_name,
                    soft, hard)  # fmt: skip
    return reply
