"""Which beat leads, which stand by, which went silent: from the beats' own reports."""

import json
import time

from jobs import heartbeat, redis
from jobs.selectors.schedules import BeatStatus, beat_processes


def report(host: str, pid: int, role: str, tick_ago: float, now: float) -> tuple[str, str]:
    value = {"host": host, "pid": pid, "role": role, "since": now - 100,
             "tick": now - tick_ago, "sent": now - 1}  # fmt: skip
    return f"{host}:{pid}", json.dumps(value)


def test_the_leader_the_standby_and_a_killed_leader_overtaken(settings):
    settings.JOBSITE_BEAT_LOCK_TTL = 30
    now = time.time()
    client = redis.client()
    client.delete(heartbeat.BEATS_KEY)
    try:
        client.hset(heartbeat.BEATS_KEY, mapping=dict([
            report("a", 1, "active", 2, now),  # killed 2 s ago: still says active
            report("b", 2, "active", 0, now),  # took over: the leader
            report("c", 3, "standby", 1, now),
            report("d", 4, "standby", 90, now),  # silent for longer than the TTL
            report("e", 5, "active", 5000, now),  # gone long ago: forgotten
            ("f:6", "not json"),
        ]))  # fmt: skip
        status = BeatStatus(None, None, False, beat_processes(now=now))
        assert status.leader is not None and status.leader.name == "b (pid 2)"
        assert [p.name for p in status.standby] == ["c (pid 3)"]
        assert [p.name for p in status.silent] == ["a (pid 1)", "d (pid 4)"]
        assert status.leader.sent_age == 1
        assert set(client.hkeys(heartbeat.BEATS_KEY)) == {b"a:1", b"b:2", b"c:3", b"d:4"}
    finally:
        client.delete(heartbeat.BEATS_KEY)


def test_no_report_no_leader():
    redis.client().delete(heartbeat.BEATS_KEY)
    status = BeatStatus(None, None, False, beat_processes())
    assert status.leader is None and status.standby == [] and status.silent == []
