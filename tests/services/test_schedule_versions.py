"""Schedule versions: every change keeps one; restore is checked, audited, a new version."""

from __future__ import annotations

import json

import pytest
from django.contrib.auth.models import Permission, User
from django_celery_beat.models import CrontabSchedule, IntervalSchedule, PeriodicTask

from jobs import services
from jobs.models import AuditAction, AuditEntry, AuditOutcome, ScheduleVersion
from jobs.services.schedules import schedule_snapshot


def hourly() -> IntervalSchedule:
    return IntervalSchedule.objects.get_or_create(every=1, period="hours")[0]


def primes(name="primes", **fields) -> PeriodicTask:
    fields.setdefault("interval", hourly())
    return PeriodicTask(name=name, task="jobs.count_primes", kwargs='{"limit": 1000}', **fields)


@pytest.fixture
def editor(submitters, job_types) -> User:
    """May change schedules and run count_primes only (not rotate_credentials)."""
    job_types["count_primes"].allowed_groups.add(submitters)
    user = User.objects.create_user("editor", is_staff=True)
    user.groups.add(submitters)
    user.user_permissions.add(
        *Permission.objects.filter(content_type__app_label="django_celery_beat")
    )
    return User.objects.get(pk=user.pk)  # a fresh permission cache


@pytest.fixture
def schedule(admin_user, job_types) -> PeriodicTask:
    return services.schedule_save(schedule=primes(), user=admin_user, created=True)


def change(schedule: PeriodicTask, user, **fields) -> PeriodicTask:
    schedule = PeriodicTask.objects.get(pk=schedule.pk)
    for name, value in fields.items():
        setattr(schedule, name, value)
    return services.schedule_save(schedule=schedule, user=user, created=False)


def versions(schedule) -> list[ScheduleVersion]:
    return list(ScheduleVersion.objects.filter(schedule=schedule).order_by("number"))


def test_creating_a_schedule_stores_version_1_with_who_and_the_fields(schedule, admin_user):
    (v1,) = versions(schedule)

    assert (v1.number, v1.action, v1.actor, v1.actor_name) == (
        1, AuditAction.SCHEDULE_CREATE, admin_user, "root",
    )  # fmt: skip
    assert v1.before == {}
    assert v1.after["kwargs"] == {"limit": 1000} and v1.after["interval"] == hourly().pk
    assert "last_run_at" not in v1.after and "total_run_count" not in v1.after


def test_a_change_stores_the_fields_before_and_after(schedule, admin_user):
    change(schedule, admin_user, kwargs='{"limit": 50}', priority=9)

    v2 = versions(schedule)[-1]
    assert v2.number == 2 and v2.action == AuditAction.SCHEDULE_CHANGE
    assert v2.changed == ["kwargs", "priority"]
    assert (v2.before["kwargs"], v2.after["kwargs"]) == ({"limit": 1000}, {"limit": 50})
    assert (v2.before["priority"], v2.after["priority"]) == (None, 9)


def test_a_save_that_changes_nothing_stores_no_version(schedule, admin_user):
    change(schedule, admin_user)

    assert len(versions(schedule)) == 1


def test_beats_own_bookkeeping_is_not_a_version(schedule):
    PeriodicTask.objects.filter(pk=schedule.pk).update(total_run_count=7)
    stored = PeriodicTask.objects.get(pk=schedule.pk)

    assert schedule_snapshot(stored) == versions(schedule)[-1].after


def test_bulk_disable_and_enable_store_a_version_for_each_schedule_that_changed(
    schedule, admin_user
):
    other = services.schedule_save(
        schedule=primes("other", enabled=False), user=admin_user, created=True
    )

    services.schedule_set_enabled(
        schedules=PeriodicTask.objects.all(), enabled=False, user=admin_user
    )
    services.schedule_set_enabled(schedules=[schedule], enabled=True, user=admin_user)

    disabled, enabled = versions(schedule)[1:]
    assert (disabled.action, disabled.changed) == (AuditAction.SCHEDULE_DISABLE, ["enabled"])
    assert (disabled.before["enabled"], disabled.after["enabled"]) == (True, False)
    assert (enabled.action, enabled.after["enabled"]) == (AuditAction.SCHEDULE_ENABLE, True)
    assert len(versions(other)) == 1  # it was disabled already: nothing changed


def test_a_schedule_from_before_versions_gets_its_stored_state_as_version_1(admin_user, job_types):
    old = primes("old")
    old.save()  # not through the services: no version

    change(old, admin_user, priority=3)

    baseline, v2 = versions(old)
    assert baseline.number == 1 and baseline.actor is None and baseline.after["priority"] is None
    assert v2.number == 2 and v2.before == baseline.after


def test_deleting_keeps_the_versions_with_the_name(schedule, admin_user):
    services.schedule_delete(schedules=[schedule], user=admin_user)

    kept = list(ScheduleVersion.objects.filter(schedule_name="primes").order_by("number"))
    assert [v.action for v in kept] == [AuditAction.SCHEDULE_CREATE, AuditAction.SCHEDULE_DELETE]
    assert all(v.schedule is None for v in kept) and kept[-1].after == {}


# --- Restore ----------------------------------------------------------------------------


def test_restore_puts_the_fields_back_as_a_new_version_and_audits(schedule, admin_user):
    daily = CrontabSchedule.objects.create(minute="0", hour="3", timezone="Europe/Berlin")
    change(schedule, admin_user, kwargs='{"limit": 50}', interval=None, crontab=daily, queue="cpu")
    v1 = versions(schedule)[0]

    restored = services.schedule_restore(schedule_id=schedule.pk, version_id=v1.pk, user=admin_user)

    stored = PeriodicTask.objects.get(pk=schedule.pk)
    assert schedule_snapshot(stored) == v1.after
    assert json.loads(stored.kwargs) == {"limit": 1000} and stored.crontab is None
    v3 = versions(schedule)[-1]
    assert (v3.number, v3.action, v3.restored_from) == (3, AuditAction.SCHEDULE_RESTORE, v1)
    assert v3.before["crontab"] == daily.pk and v3.after == v1.after
    entry = AuditEntry.objects.get(action=AuditAction.SCHEDULE_RESTORE)
    assert entry.outcome == AuditOutcome.OK and entry.target_id == str(restored.pk)
    assert entry.details["version"] == 1 and "kwargs" in entry.details["changed"]


def _refused(schedule, user, version_id, match: str, outcome=AuditOutcome.FAILED):
    before = schedule_snapshot(PeriodicTask.objects.get(pk=schedule.pk))
    count = ScheduleVersion.objects.count()

    with pytest.raises(services.ActionError, match=match):
        services.schedule_restore(schedule_id=schedule.pk, version_id=version_id, user=user)

    assert schedule_snapshot(PeriodicTask.objects.get(pk=schedule.pk)) == before
    assert ScheduleVersion.objects.count() == count
    entry = AuditEntry.objects.filter(action=AuditAction.SCHEDULE_RESTORE).get()
    assert entry.outcome == outcome and entry.target_id == str(schedule.pk)


def test_restoring_a_version_of_another_schedule_changes_nothing(schedule, admin_user):
    other = services.schedule_save(
        schedule=primes("other", priority=1), user=admin_user, created=True
    )

    _refused(schedule, admin_user, versions(other)[0].pk, "no such version")


def test_restoring_a_missing_version_changes_nothing(schedule, admin_user):
    _refused(schedule, admin_user, 999_999, "no such version")
    AuditEntry.objects.all().delete()
    _refused(schedule, admin_user, None, "no such version")


def test_restoring_a_deletion_is_refused(admin_user, job_types, schedule):
    deletion = ScheduleVersion.objects.create(
        schedule=schedule, schedule_name="primes", number=9,
        action=AuditAction.SCHEDULE_DELETE, before=versions(schedule)[0].after, after={},
    )  # fmt: skip

    _refused(schedule, admin_user, deletion.pk, "deleted the schedule")


def test_restore_needs_the_change_permission(schedule, admin_user, job_types):
    viewer = User.objects.create_user("viewer", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_periodictask"))
    change(schedule, admin_user, priority=2)

    _refused(schedule, viewer, versions(schedule)[0].pk, "may not change", AuditOutcome.DENIED)


def test_an_editor_may_restore_their_own_job_types_schedule(schedule, admin_user, editor):
    change(schedule, admin_user, priority=2)

    services.schedule_restore(
        schedule_id=schedule.pk, version_id=versions(schedule)[0].pk, user=editor
    )

    assert PeriodicTask.objects.get(pk=schedule.pk).priority is None
    assert versions(schedule)[-1].actor == editor


def test_an_editor_may_not_restore_a_schedule_of_a_job_type_they_may_not_run(admin_user, editor):
    rotate = PeriodicTask(
        name="rotate", task="jobs.rotate_credentials", interval=hourly(),
        kwargs=json.dumps({"service": "db", "new_password": "s3cret-s3cret"}),
    )  # fmt: skip
    services.schedule_save(schedule=rotate, user=admin_user, created=True)
    change(rotate, admin_user, priority=4)

    _refused(rotate, editor, versions(rotate)[0].pk, "may not change", AuditOutcome.DENIED)


def test_an_editor_may_not_restore_a_version_running_a_job_type_they_may_not_run(
    schedule, admin_user, editor
):
    change(
        schedule, admin_user, task="jobs.rotate_credentials",
        kwargs=json.dumps({"service": "db", "new_password": "s3cret-s3cret"}),
    )  # fmt: skip
    change(schedule, admin_user, task="jobs.count_primes", kwargs='{"limit": 5}')
    rotate_version = versions(schedule)[1]

    _refused(schedule, editor, rotate_version.pk, "may not schedule", AuditOutcome.DENIED)


def test_a_version_whose_interval_was_deleted_is_refused(schedule, admin_user):
    every_5 = IntervalSchedule.objects.create(every=5, period="minutes")
    change(schedule, admin_user, interval=every_5)
    change(schedule, admin_user, interval=hourly())
    version = versions(schedule)[1]
    every_5.delete()

    _refused(schedule, admin_user, version.pk, "interval time was deleted")


def test_a_version_whose_parameters_are_no_longer_valid_is_refused(schedule, admin_user):
    broken = ScheduleVersion.objects.create(
        schedule=schedule, schedule_name="primes", number=9, action=AuditAction.SCHEDULE_CHANGE,
        before={}, after={**versions(schedule)[0].after, "kwargs": {"limit": "many"}},
    )  # fmt: skip

    _refused(schedule, admin_user, broken.pk, "parameters are not valid")


def test_a_version_whose_name_another_schedule_took_is_refused(schedule, admin_user):
    change(schedule, admin_user, name="renamed")
    services.schedule_save(schedule=primes("primes"), user=admin_user, created=True)

    _refused(schedule, admin_user, versions(schedule)[0].pk, "another schedule is now called")
