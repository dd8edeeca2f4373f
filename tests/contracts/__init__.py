"""Contract tests: the private shapes of the pinned libraries that Jobsite overrides.

Each test pins one internal listed in docs/internals.md; when an upgrade changes it,
the test fails and names what to revisit. No broker, no worker: they run in seconds.
"""
