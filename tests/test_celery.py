"""jobs.celery.install: Jobsite's pieces where the project set nothing, its own otherwise."""

from celery import Celery, signals

import jobs.celery
from jobs import celery as wiring


def _app(**settings) -> Celery:
    class Config:
        pass

    for name, value in settings.items():
        setattr(Config, name, value)
    app = Celery("probe", set_as_current=False)
    app.config_from_object(Config, namespace="CELERY")
    return jobs.celery.install(app)


def test_jobsite_pieces_are_set_where_the_project_set_nothing():
    conf = _app(CELERY_BROKER_URL="redis://127.0.0.1:1/0").conf
    assert conf.result_backend == wiring.RESULT_BACKEND
    assert conf.worker_consumer == wiring.WORKER_CONSUMER
    assert conf.beat_scheduler == wiring.BEAT_SCHEDULER
    assert conf.task_track_started is True and conf.result_extended is True
    assert conf.accept_content == ["json"]
    assert conf.task_default_queue == "default"
    assert {q.name for q in conf.task_queues} >= {"default", "cpu", "reports"}


def test_what_the_project_sets_itself_wins():
    conf = _app(
        CELERY_BROKER_URL="redis://127.0.0.1:1/0",
        CELERY_RESULT_BACKEND="rpc://",
        CELERY_ACCEPT_CONTENT=["msgpack", "json"],
        CELERY_TASK_DEFAULT_QUEUE="celery",
    ).conf
    assert conf.result_backend == "rpc://"
    assert conf.accept_content == ["msgpack", "json"]
    assert conf.task_default_queue == "celery"
    assert conf.worker_consumer == wiring.WORKER_CONSUMER  # what it left alone is Jobsite's


def test_a_piece_can_be_left_out():
    app = Celery("probe", set_as_current=False)
    app.conf.broker_url = "redis://127.0.0.1:1/0"
    jobs.celery.install(app, beat_scheduler=None, worker_consumer=None)
    assert app.conf.beat_scheduler == "celery.beat:PersistentScheduler"  # Celery's default
    assert app.conf.worker_consumer == "celery.worker.consumer:Consumer"
    assert app.conf.result_backend == wiring.RESULT_BACKEND
    assert wiring.installed(app)


def test_the_worker_handlers_are_connected_once_whatever_the_number_of_apps():
    def ours(signal):
        return [r for r in signal.receivers if isinstance(r[1], wiring._Forward)]

    before = len(ours(signals.task_prerun))
    _app()
    _app()
    assert len(ours(signals.task_prerun)) == before == 1
    assert len(ours(signals.worker_shutdown)) == 1
