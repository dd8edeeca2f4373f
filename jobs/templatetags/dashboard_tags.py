"""Template helpers for the dashboard and the admin index summary."""

from __future__ import annotations

from django import template

from jobs.models import JobState
from jobs.selectors import stats

register = template.Library()


@register.filter
def seconds(value: float | None) -> str:
    """A duration in seconds, readably: 0.42 s, 12.3 s, 4 m 05 s, 2 h 03 m."""
    if value is None:
        return "—"
    value = float(value)
    if value < 10:
        return f"{value:.2f} s"
    if value < 60:
        return f"{value:.1f} s"
    minutes, secs = divmod(round(value), 60)
    if minutes < 60:
        return f"{minutes} m {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} m"


@register.simple_tag(takes_context=True)
def jobsite_summary(context) -> dict:
    """Runs by state, workers online and beat, for the admin index (cached a few seconds)."""
    user = context["request"].user
    counts = stats.runs_by_state(user=user)
    return {
        "states": [(state, label, counts.get(state, 0)) for state, label in JobState.choices],
        "system": stats.system_status(),
        "beat_warn_after": stats.BEAT_WARN_AFTER,
    }
