"""The worker's message consumer, extended to record bad messages.

Celery already refuses what it cannot run (undecodable or non-JSON bodies, unknown
task names, malformed headers) and only logs it; these overrides also write an audit
entry, so an operator sees that something put a bad message on the broker, and refuse
messages over JOBSITE_MAX_MESSAGE_BYTES before they reach a pool process. Compressed
bodies are held to the same limit while they are decompressed (jobs.worker.compression).
"""

from __future__ import annotations

import logging
import types

from celery.worker.consumer import Consumer
from django.conf import settings
from django.db import close_old_connections

from jobs.models import AuditAction, AuditOutcome
from jobs.services import audit_record
from jobs.worker import buffer, commit, compression, quorum
from jobs.worker import control as _control  # noqa: F401  (registers its remote-control commands)

logger = logging.getLogger(__name__)


def record_rejected(message, reason: str) -> None:
    # The worker's main process has no request cycle: renew a broken connection first.
    close_old_connections()
    headers = dict(message.headers or {})
    try:
        audit_record(
            actor=None,
            action=AuditAction.MESSAGE_REJECTED,
            target_type="message",
            target_id=str(headers.get("id") or "?"),
            target_repr=str(headers.get("task") or "")[:300],
            outcome=AuditOutcome.DENIED,
            details={
                "reason": reason[:1000],
                "content_type": message.content_type,
                "bytes": len(message.body or b""),
                "queue": (message.delivery_info or {}).get("routing_key"),
            },
        )
    except Exception:  # the database may be the problem: the log line must survive
        logger.exception("Could not record a rejected message (%s)", reason)


class JobsiteConsumer(Consumer):
    class Blueprint(Consumer.Blueprint):  # type: ignore[misc, valid-type]  # not in the stubs
        # Native delayed delivery without the headers queues (jobs.worker.quorum).
        default_steps = [
            quorum.JOBSITE_STEP if step == quorum.CELERY_STEP else step
            for step in Consumer.Blueprint.default_steps
        ]

    def create_task_handler(self, *args, **kwargs):
        handle = super().create_task_handler(*args, **kwargs)
        commit.install(self)
        limit = settings.JOBSITE_MAX_MESSAGE_BYTES
        # kombu decompresses as it builds each Message, before on_task_received below.
        compression.install(limit)

        def on_task_received(message):
            message.ack_log_error = self._safe_ack(message, (message.headers or {}).get("id"))
            size = len(message.body or b"")
            if size > limit:
                logger.error("Rejected a %d-byte message (limit %d)", size, limit)
                record_rejected(message, f"message of {size} bytes exceeds {limit}")
                # Set in Consumer.__init__; celery-types do not list it.
                message.reject_log_error(logger, self.connection_errors)  # type: ignore[attr-defined]
                return None
            return handle(message)

        return on_task_received

    def call_soon_ack(self, p, *args, **kwargs):
        # Celery schedules each ack for the event loop's next turn. The group commit
        # acknowledges its stored batch from the event loop already, and at once, so
        # that a Redis batch goes out in one pipeline (commit.redis_acks_pipelined).
        if commit.acking():
            p(*args, **kwargs)
            return p
        # Consumer.call_soon_ack exists (Celery 5.5+); celery-types do not list it.
        return super().call_soon_ack(p, *args, **kwargs)  # type: ignore[misc]

    def _safe_ack(self, message, task_id: str | None):
        """Acknowledge, also when the message's channel died with a Redis connection.

        An acks_late task that finishes after a Redis reconnect acks through its old,
        closed channel; kombu then raises AttributeError, which Celery treats as
        unrecoverable and the worker stops. The acknowledgement is only the removal of
        the delivery tag from Redis's unacked index, so it is done on the new connection.

        It is a method of the message named ``ack_log_error``, as kombu's own: Celery's
        prefork pool runs the acks queued while it is joined at warm shutdown only when
        they are (celery.concurrency.prefork._is_ack_callback; docs/internals.md).
        """
        ack = message.ack_log_error
        consumer = self

        def ack_log_error(bound, log, errors, *args, **kwargs):
            # Acknowledged: the run has started (early ack) or its final state is stored
            # (acks_late), so its buffered RECEIVED write is moot — in a busy worker most
            # runs finish before the buffer is written, and cost it nothing.
            if task_id:
                buffer.received.discard(task_id)
            try:
                return ack(log, errors, *args, **kwargs)
            except AttributeError:
                return consumer._ack_on_current_connection(bound)

        return types.MethodType(ack_log_error, message)

    def _ack_on_current_connection(self, message) -> None:
        tag = message.delivery_tag
        try:
            # kombu's Redis channel has qos; a None connection fails into the except.
            qos = self.connection.default_channel.qos  # type: ignore[union-attr]
            qos._remove_from_indices(tag).execute()  # kombu's Redis QoS.ack, minus the channel
        except Exception as exc:  # it comes back after the visibility timeout instead
            logger.warning("Could not acknowledge %s after a reconnect: %s", tag, exc)
        else:
            logger.info("Acknowledged %s on the new broker connection", tag)

    def stop(self):
        # Celery closes the channel next: acknowledge the runs whose final states are
        # stored by then (the rest go back to the queue, as Celery's own acks would).
        commit.drain()
        return super().stop()

    def shutdown(self):
        commit.shutdown()  # the runs that finished since: stored before the process exits
        return super().shutdown()

    def on_decode_error(self, message, exc):
        if isinstance(exc, compression.TooLarge):
            logger.error("Rejected a compressed message: %s", exc)
            record_rejected(message, str(exc))
        else:
            record_rejected(message, f"undecodable: {exc!r}")
        return super().on_decode_error(message, exc)

    def on_unknown_message(self, body, message):
        record_rejected(message, "not a task message")
        return super().on_unknown_message(body, message)

    def on_unknown_task(self, body, message, exc):
        record_rejected(message, f"unknown task: {exc!r}")
        return super().on_unknown_task(body, message, exc)

    def on_invalid_task(self, body, message, exc):
        record_rejected(message, f"invalid task message: {exc!r}")
        return super().on_invalid_task(body, message, exc)

    def on_connection_error_after_connected(self, exc):
        # On a broken Redis connection, kombu's channel close tries to restore unacked
        # messages through that same connection and raises AttributeError ('NoneType'
        # object has no attribute 'hostname'; kombu #582/#970), which Celery treats as
        # unrecoverable: the worker dies and stops consuming. Skipping that restore is
        # safe: the messages stay in Redis's unacked index and come back after the
        # visibility timeout, and acks from tasks still running work on the new connection.
        connection = self.connection
        if connection is not None:
            close = connection.close

            def safe_close():
                try:
                    return close()
                except AttributeError as error:
                    logger.warning("Broken broker connection not closed cleanly: %s", error)
                    return None

            connection.close = safe_close  # type: ignore[method-assign]  # on purpose, see above
        return super().on_connection_error_after_connected(exc)
