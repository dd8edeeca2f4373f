"""The errors services raise, and the broker errors they catch."""

from __future__ import annotations

import logging

from kombu.exceptions import OperationalError

logger = logging.getLogger(__name__)


# Errors that mean "the broker is unreachable": the run stays stored, unsent.
BROKER_ERRORS = (OperationalError, ConnectionError, OSError, TimeoutError)


class ActionError(Exception):
    """The action does not apply to this run in its current state (shown to the user)."""
