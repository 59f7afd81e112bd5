"""A PNG of the dashboard page, taken by Debian's chromium (headless) driven by Playwright:
the demo's report shows the page as it was at the end of the run.

Playwright is a dev extra (``make setup`` installs it and the browser); without either, no
screenshot is taken and the caller says so. The token, if any, travels as a request header,
never on a command line.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

CHROMIUM = Path("/usr/bin/chromium")


def screenshot(
    url: str,
    path: Path,
    *,
    token: str | None = None,
    settle_s: float = 2.0,
    browser: Path = CHROMIUM,
    timeout_s: float = 60.0,
) -> str | None:
    """Save the page at ``url`` as ``path`` once it has drawn a few live updates; returns None
    when it did, else why not (no Playwright, no browser, the page did not load)."""
    try:
        from playwright.sync_api import Error, sync_playwright
    except ImportError:
        return "playwright is not installed (pip install -e '.[dev]')"
    if not browser.exists():
        return f"no browser at {browser} (apt-get install chromium)"
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        with sync_playwright() as playwright:
            chromium = playwright.chromium.launch(executable_path=str(browser), headless=True)
            try:
                page = chromium.new_page(viewport={"width": 1400, "height": 1000},
                                         extra_http_headers=headers)
                page.goto(url, timeout=timeout_s * 1000)
                page.wait_for_function("() => Number(document.body.dataset.seq || 0) >= 2",
                                       timeout=timeout_s * 1000)
                page.wait_for_timeout(settle_s * 1000)  # the pictures of the last update
                path.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(path), full_page=True)
            finally:
                chromium.close()
    except Error as error:
        log.warning("dashboard screenshot failed: %s", error)
        return f"the browser failed: {str(error).splitlines()[0][:200]}"
    return None
