"""Queues, exchanges and routes: direct, topic, fanout and headers.

- ``default`` (direct): the queues ``default``, ``reports`` and ``cpu``, each bound by
  its own name. Most job types choose one of them.
- ``reports.topic`` (topic): routing keys ``reports.<kind>.<region>``; ``reports_emea``
  is bound with ``reports.*.emea``, ``reports_all`` with ``reports.#``. A key that
  matches both bindings is delivered to both queues (topic semantics).
- ``broadcast_tasks`` (fanout, kombu's ``Broadcast``): every worker declares its own
  auto-deleted queue bound to it, so each worker gets its own copy of a message.
- ``jobs.headers`` (headers, RabbitMQ only): queues bound on message headers with
  ``x-match`` ``all`` or ``any``. kombu's Redis transport emulates direct, topic and
  fanout but has no headers exchange, so these queues are declared only on RabbitMQ
  and a headers-routed job is refused at submit on Redis.

Every point-to-point queue is declared with ``x-max-priority`` so priorities work on
RabbitMQ; on Redis kombu emulates them with one list per priority step.
A worker started without ``-Q`` consumes all of these.

With ``JOBSITE_QUEUE_TYPE=quorum`` (RabbitMQ only) the same queues are declared as
quorum queues (replicated over a cluster's nodes; see ``queue_arguments``): no
``x-max-priority`` (RabbitMQ 3.x quorum queues have no priorities), a delivery limit
after which a message is dead-lettered to ``jobs.dead_letter``, and the ``default``
exchange is a topic exchange, because Celery's native delayed delivery (countdown,
ETA, which quorum queues need) skips direct exchanges. A topic binding without
wildcards routes exactly as a direct one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from django.core.exceptions import ValidationError
from kombu import Exchange, Queue
from kombu.common import Broadcast
from kombu.transport.virtual.exchange import TopicExchange

MAX_PRIORITY = 10
PRIORITY_ARGS = {"x-max-priority": MAX_PRIORITY}
QUEUE_TYPES = ("classic", "quorum")
# A quorum queue dead-letters a message delivered (and returned) more than this many
# times, instead of redelivering it for ever: a run that kills its worker every time.
DEFAULT_DELIVERY_LIMIT = 5
DEAD_LETTER_EXCHANGE = "jobs.dead_letter"
DEAD_LETTER_QUEUE = "jobs.dead_letter"

default_exchange = Exchange("default", type="direct")
reports_topic = Exchange("reports.topic", type="topic")
headers_exchange = Exchange("jobs.headers", type="headers")
BROADCAST_EXCHANGE = "broadcast_tasks"


def queue_arguments(queue_type: str = "classic", delivery_limit: int = DEFAULT_DELIVERY_LIMIT):
    """``x-`` arguments of Jobsite's point-to-point queues for a queue type."""
    if queue_type == "classic":
        return dict(PRIORITY_ARGS)
    return {
        "x-queue-type": "quorum",
        "x-delivery-limit": delivery_limit,
        "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
        # at-least-once: RabbitMQ keeps the message until the dead-letter queue has
        # confirmed it (the default, at-most-once, may lose it); it needs reject-publish.
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


def _declared_queues(queue_type: str, delivery_limit: int) -> tuple[Queue, ...]:
    args = queue_arguments(queue_type, delivery_limit)
    # Native delayed delivery binds a queue through its exchange, and not a direct one.
    direct = Exchange("default", type="topic") if queue_type == "quorum" else default_exchange

    def headers(name: str, match: str, **binding) -> Queue:
        bind = {"x-match": match, **binding}
        return Queue(name, headers_exchange, binding_arguments=bind, queue_arguments=args)

    return (
        *(Queue(name, direct, routing_key=name, queue_arguments=args) for name in _DIRECT),
        *(Queue(n, reports_topic, routing_key=p, queue_arguments=args) for n, p in _TOPIC),
        # Both capabilities required: a GPU and data kept in the EU.
        headers("gpu_emea", "all", gpu="yes", region="emea"),
        # Either is enough: a GPU, or the express lane.
        headers("accelerated", "any", gpu="yes", lane="express"),
    )


_DIRECT = ("default", "reports", "cpu")
_TOPIC = (("reports_emea", "reports.*.emea"), ("reports_all", "reports.#"))
QUEUES = _declared_queues("classic", DEFAULT_DELIVERY_LIMIT)
DIRECT_QUEUES, TOPIC_QUEUES, HEADERS_QUEUES = QUEUES[:3], QUEUES[3:5], QUEUES[5:]
# The queues people choose from (forms, queue pages, metrics): the direct ones.
QUEUE_NAMES = tuple(q.name for q in DIRECT_QUEUES)
# Every point-to-point queue (the broadcast queues are per worker and auto-deleted).
ALL_QUEUE_NAMES = tuple(q.name for q in QUEUES)


def is_rabbitmq(broker_url: str) -> bool:
    return (broker_url or "").startswith(("amqp", "pyamqp"))


def queues_for(
    broker_url: str,
    queue_type: str = "classic",
    delivery_limit: int = DEFAULT_DELIVERY_LIMIT,
) -> tuple[Queue, ...]:
    """What workers on this broker consume by default (``task_queues``)."""
    # An explicit key: Celery would give an empty one its default ("default"), and
    # kombu's Redis fanout delivers only to subscribers bound with the published key.
    broadcast = Broadcast(BROADCAST_EXCHANGE, routing_key=BROADCAST_EXCHANGE)
    if is_rabbitmq(broker_url):
        return (*_declared_queues(queue_type, delivery_limit), broadcast)
    return (*DIRECT_QUEUES, *TOPIC_QUEUES, broadcast)


def dead_letter_queue() -> Queue:
    """Where quorum queues put messages over their delivery limit (nobody consumes it)."""
    exchange = Exchange(DEAD_LETTER_EXCHANGE, type="fanout")
    return Queue(DEAD_LETTER_QUEUE, exchange, queue_arguments={"x-queue-type": "quorum"})


def wire_priority(priority: int | None, broker_url: str) -> int | None:
    """The priority to put on the message so that 9 is the highest on both brokers.

    RabbitMQ delivers the highest number first. kombu's Redis transport pops its
    priority lists in ascending order (``queue``, ``queue:1``, ... ``queue:9``), so
    there 0 is served first: Jobsite's 0-9 scale is mirrored for Redis.
    """
    if priority is None or is_rabbitmq(broker_url):
        return priority
    return 9 - max(0, min(9, int(priority)))


# --- Routes: how a job type's messages reach queues --------------------------------


@dataclass(frozen=True)
class Route:
    """Where a job type's runs are published.

    ``key`` is a routing-key template filled from the run's parameters (topic);
    ``header_params`` names the parameters sent as message headers (headers).
    """

    exchange: Exchange
    key: str = ""
    header_params: dict[str, str] = field(default_factory=dict)

    @property
    def type(self) -> str:
        return self.exchange.type

    def routing_key(self, params: dict) -> str:
        try:
            return self.key.format(**params)
        except (KeyError, IndexError, ValueError) as exc:
            raise ValidationError(f"Cannot build the routing key {self.key!r}: {exc}") from exc

    def headers(self, params: dict) -> dict[str, str]:
        return {h: _header_value(params.get(name)) for h, name in self.header_params.items()}


def _header_value(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    return "" if value is None else str(value)


ROUTES: dict[str, Route] = {
    "regional-reports": Route(reports_topic, key="reports.{kind}.{region}"),
    "broadcast": Route(Exchange(BROADCAST_EXCHANGE, type="fanout")),
    "capabilities": Route(
        headers_exchange, header_params={"gpu": "gpu", "region": "region", "lane": "lane"}
    ),
}


def topic_matches(pattern: str, key: str) -> bool:
    """AMQP topic matching (``*`` one word, ``#`` any words), as kombu emulates it."""
    matcher = TopicExchange(None)
    # kombu's own matcher, a private method its stubs do not list.
    return bool(matcher._match(matcher.key_to_pattern(pattern), key))  # type: ignore[attr-defined]


def headers_match(binding: dict, headers: dict) -> bool:
    """AMQP headers matching: ``x-match`` ``all`` (default) or ``any`` of the binding."""
    wanted = {k: v for k, v in binding.items() if not k.startswith("x-")}
    hits = [headers.get(k) == v for k, v in wanted.items()]
    return any(hits) if binding.get("x-match") == "any" else all(hits)


def queues_matching(route: Route, routing_key: str, headers: dict) -> list[str]:
    """The queues Jobsite declares that a message with this key/headers reaches."""
    if route.type == "topic":
        return [
            q.name
            for q in TOPIC_QUEUES
            if q.exchange.name == route.exchange.name and topic_matches(q.routing_key, routing_key)
        ]
    if route.type == "headers":
        return [q.name for q in HEADERS_QUEUES if headers_match(q.binding_arguments or {}, headers)]
    if route.type == "fanout":
        return [BROADCAST_EXCHANGE]
    return [routing_key]


def route_options(route_name: str, params: dict, broker_url: str) -> dict:
    """A run's routing options (stored in Job.options, shown on its page).

    Raises ValidationError when the broker cannot route it (headers on Redis) or when
    no queue is bound for it: an unroutable message would be dropped silently.
    """
    route = ROUTES[route_name]
    if route.type == "headers" and not is_rabbitmq(broker_url):
        raise ValidationError(
            "This job type is routed by message headers, which only RabbitMQ supports: "
            "kombu's Redis transport has no headers exchange. Use a RabbitMQ broker."
        )
    key = route.routing_key(params) if route.key else ""
    headers = route.headers(params)
    queues = queues_matching(route, key, headers)
    if not queues:
        raise ValidationError(
            f"No queue is bound to {route.exchange.name} ({route.type}) for "
            f"{key or headers}: the message would be lost."
        )
    return {
        "route": route_name,
        "exchange": route.exchange.name,
        "exchange_type": route.type,
        # Fanout ignores the key on RabbitMQ; on Redis (kombu's fanout_patterns) a
        # broadcast only reaches queues bound with the same key (see queues_for).
        "routing_key": key or route.exchange.name,
        "route_headers": headers,
        "queue": queues[0],
        "queues": queues,
    }


def uses_quorum(queues) -> bool:
    """Whether these are quorum queues (as Celery detects them for delayed delivery)."""
    return any((q.queue_arguments or {}).get("x-queue-type") == "quorum" for q in queues)


def native_delay(seconds: float) -> float:
    """A delay Celery's native delayed delivery can publish: none, or 1 s at least.

    Celery 5.7.0 routes a delay through the ``celery_delayed_*`` queues by its whole
    seconds (``int(countdown)``) and kombu refuses 0 ("countdown must be a positive
    number"): a retry's 0.4 s backoff would fail the publish, and with it the run.
    """
    return max(seconds, 1.0) if seconds > 0 else seconds


def check_delayable(options: dict) -> None:
    """Refuse a countdown/ETA that native delayed delivery cannot route back (quorum).

    RabbitMQ's delay queues hand a message back through a topic binding on its routing
    key: a headers exchange has no key to bind on (jobs.worker.quorum), and the
    workers' broadcast queues are never bound, so the run would be lost.
    """
    if options["exchange_type"] in ("headers", "fanout"):
        raise ValidationError(
            f"A {options['exchange_type']}-routed run cannot start later on quorum queues: "
            "RabbitMQ's delayed delivery routes by key. Submit it without a countdown or ETA."
        )


def publish_kwargs(options: dict, queues: tuple[Queue, ...] = QUEUES) -> dict:
    """``send_task`` arguments for a run routed through a non-direct exchange.

    ``queues``: the app's ``task_queues``, so that a bound queue is declared with the
    arguments (queue type) workers declare it with.
    """
    route = ROUTES[options["route"]]
    declare: list[Exchange | Queue] = [route.exchange]
    if route.type in ("topic", "headers"):
        declare += [
            q
            for q in queues
            if q.name in options["queues"] and q.exchange.name == route.exchange.name
        ]
    return {
        "queue": None,
        "exchange": route.exchange.name,
        "exchange_type": route.type,
        "routing_key": options["routing_key"],
        # Declaring the bound queues first means a message sent before any worker
        # started still has somewhere to wait (RabbitMQ drops unroutable messages).
        "declare": declare,
    }
