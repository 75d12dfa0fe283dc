"""Launch the system's headless Chromium for tests (Python Playwright driving /usr/bin/chromium).

No browser is downloaded: ``playwright install`` is never run; Playwright only drives the Chromium that the OS
package manager installed (Debian: ``apt-get install chromium``). Override the binary with $RESDX_CHROMIUM.
Under CI (CI=true) a missing browser or Playwright fails the test; locally it skips.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
]
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def missing(msg: str) -> None:
    """Fail under CI, skip locally."""
    if in_ci():
        pytest.fail(msg, pytrace=False)
    pytest.skip(msg)


def find_chromium() -> str | None:
    env = os.environ.get("RESDX_CHROMIUM")
    if env:
        return env if os.access(env, os.X_OK) else None
    for cand in ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(cand)
        if path:
            return path
    return None


def require_chromium() -> str:
    path = find_chromium()
    if path is None:
        missing("Chromium not found (apt-get install chromium, or set RESDX_CHROMIUM)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing("Python Playwright not installed (pip install playwright; no `playwright install` needed)")
    return path


@contextlib.contextmanager
def chromium_context(viewport=(1280, 900), timeout_ms: int = 20_000) -> Iterator:
    """A Playwright BrowserContext in a fresh profile (temporary --user-data-dir), downloads accepted."""
    from playwright.sync_api import sync_playwright

    exe = require_chromium()
    with tempfile.TemporaryDirectory(prefix="resdx-chromium-") as profile, sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(
            profile,  # Playwright passes it as --user-data-dir
            executable_path=exe,
            args=CHROMIUM_ARGS,
            headless=True,
            accept_downloads=True,
            viewport={"width": viewport[0], "height": viewport[1]},
            offline=True,
        )
        ctx.set_default_timeout(timeout_ms)
        try:
            yield ctx
        finally:
            ctx.close()
