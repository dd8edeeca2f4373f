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
"""

from __future__ import annotations

from dataclasses import dataclass, field

from django.core.exceptions import ValidationError
from kombu import Exchange, Queue
from kombu.common import Broadcast
from kombu.transport.virtual.exchange import TopicExchange

MAX_PRIORITY = 10
PRIORITY_ARGS = {"x-max-priority": MAX_PRIORITY}

default_exchange = Exchange("default", type="direct")
reports_topic = Exchange("reports.topic", type="topic")
headers_exchange = Exchange("jobs.headers", type="headers")
BROADCAST_EXCHANGE = "broadcast_tasks"


def _direct(name: str) -> Queue:
    return Queue(name, default_exchange, routing_key=name, queue_arguments=PRIORITY_ARGS)


def _topic(name: str, pattern: str) -> Queue:
    return Queue(name, reports_topic, routing_key=pattern, queue_arguments=PRIORITY_ARGS)


def _headers(name: str, match: str, **binding) -> Queue:
    return Queue(
        name,
        headers_exchange,
        binding_arguments={"x-match": match, **binding},
        queue_arguments=PRIORITY_ARGS,
    )


DIRECT_QUEUES = (_direct("default"), _direct("reports"), _direct("cpu"))
TOPIC_QUEUES = (_topic("reports_emea", "reports.*.emea"), _topic("reports_all", "reports.#"))
HEADERS_QUEUES = (
    # Both capabilities required: a GPU and data kept in the EU.
    _headers("gpu_emea", "all", gpu="yes", region="emea"),
    # Either is enough: a GPU, or the express lane.
    _headers("accelerated", "any", gpu="yes", lane="express"),
)
QUEUES = (*DIRECT_QUEUES, *TOPIC_QUEUES, *HEADERS_QUEUES)
# The queues people choose from (forms, queue pages, metrics): the direct ones.
QUEUE_NAMES = tuple(q.name for q in DIRECT_QUEUES)
# Every point-to-point queue (the broadcast queues are per worker and auto-deleted).
ALL_QUEUE_NAMES = tuple(q.name for q in QUEUES)


def is_rabbitmq(broker_url: str) -> bool:
    return (broker_url or "").startswith(("amqp", "pyamqp"))


def queues_for(broker_url: str) -> tuple[Queue, ...]:
    """What workers on this broker consume by default (``task_queues``)."""
    # An explicit key: Celery would give an empty one its default ("default"), and
    # kombu's Redis fanout delivers only to subscribers bound with the published key.
    broadcast = Broadcast(BROADCAST_EXCHANGE, routing_key=BROADCAST_EXCHANGE)
    if is_rabbitmq(broker_url):
        return (*QUEUES, broadcast)
    return (*DIRECT_QUEUES, *TOPIC_QUEUES, broadcast)


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


def publish_kwargs(options: dict) -> dict:
    """``send_task`` arguments for a run routed through a non-direct exchange."""
    route = ROUTES[options["route"]]
    declare: list[Exchange | Queue] = [route.exchange]
    if route.type == "topic":
        declare += [q for q in TOPIC_QUEUES if q.name in options["queues"]]
    elif route.type == "headers":
        declare += [q for q in HEADERS_QUEUES if q.name in options["queues"]]
    return {
        "queue": None,
        "exchange": route.exchange.name,
        "exchange_type": route.type,
        "routing_key": options["routing_key"],
        # Declaring the bound queues first means a message sent before any worker
        # started still has somewhere to wait (RabbitMQ drops unroutable messages).
        "declare": declare,
    }
