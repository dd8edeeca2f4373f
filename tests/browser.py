"""Playwright helpers for the browser tests: Debian's Chromium, logins, screenshots.

The browser is the system's Chromium (`apt-get install chromium`), never a browser
downloaded by `playwright install`: CI installs it with apt (see .ci/run).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from playwright.sync_api import Page, expect

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Commit-sized README images: the viewport only, never the full page.
VIEWPORT = {"width": 1280, "height": 800}
SCREENSHOTS = ROOT / "docs" / "screenshots"
TIMEOUT_MS = 20_000


def login(page: Page, username: str, password: str) -> None:
    page.goto("/accounts/login/")
    page.fill("#id_username", username)
    page.fill("#id_password", password)
    page.click("button[type=submit]")
    expect(page.locator(".logout")).to_contain_text(username)


def csrf_headers(page: Page) -> dict[str, str]:
    """The CSRF header a same-origin POST from this page would carry."""
    cookies = {c["name"]: c["value"] for c in page.context.cookies()}
    return {"X-CSRFToken": cookies["csrftoken"], "Referer": page.url}


def screenshot(page: Page, name: str) -> Path:
    """Write docs/screenshots/<name>.png, replacing it atomically (runs may overlap)."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    target = SCREENSHOTS / f"{name}.png"
    data = page.screenshot(type="png", animations="disabled", caret="hide")
    fd, tmp = tempfile.mkstemp(dir=SCREENSHOTS, prefix=f".{name}-", suffix=".png")
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.chmod(tmp, 0o644)  # mkstemp makes it private; it is a docs file
    os.replace(tmp, target)
    return target


def mark_window(page: Page) -> None:
    """Put a marker on `window`: it survives htmx swaps, but not a page load."""
    page.evaluate("window.__jobsiteMarker = 'same page'")


def window_is_marked(page: Page) -> bool:
    return page.evaluate("window.__jobsiteMarker === 'same page'")
