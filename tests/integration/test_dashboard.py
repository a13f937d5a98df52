"""The web dashboard in a real browser: Playwright drives Debian's Chromium (headless) against
``vmferry serve`` and a lab of 2 hosts with one small guest.

An operator logs in with a token, starts a migration with the dashboard's button and watches it
live (phase, bytes, ETA, the curve growing) to its report: predicted vs actual total time, QEMU
downtime and guest-felt downtime, and the progress curve. The page's history and ``vmferry
history`` say the operator asked. A viewer then sees the same page without any button, and a
POST with the viewer's credentials is refused (403), as one with the session cookie but
without the page's CSRF header (401).

Screenshots go to ``$VMFERRY_SCREENSHOTS`` if set, else to the test's temporary directory.
The committed set in docs/screenshots/ comes from::

    VMFERRY_SCREENSHOTS=docs/screenshots flock /tmp/vmferry-qemu.lock \\
        uv run pytest tests/integration/test_dashboard.py
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from labcli import Lab
from playwright.sync_api import Browser, BrowserContext, Page, expect, sync_playwright
from servekit import serving

pytestmark = pytest.mark.qemu

CHROMIUM = "/usr/bin/chromium"  # Debian's (scripts/setup-host.sh installs it); no download
SMALL = "dirty:rate=2M,size=32M,pattern=random,mode=paced"
MOVE_S = 90  # the longest the move may take to show its report (it takes ~6 s)

# Collects what the page showed of every live move, however briefly (phases, ETAs).
_RECORDER = """() => {
  window.seen = { phases: [], etas: [], stats: [] };
  const record = () => {
    for (const live of document.querySelectorAll(".live")) {
      window.seen.phases.push(live.dataset.phase);
      window.seen.etas.push(live.querySelector(".eta").textContent);
      window.seen.stats.push(live.querySelector(".stats").textContent);
    }
  };
  new MutationObserver(record).observe(document.getElementById("jobs"),
    { subtree: true, childList: true, characterData: true });
}"""

_POST_AS_PAGE = """async (csrf) => {
  const headers = { "Content-Type": "application/json" };
  if (csrf) headers["X-Vmferry-Csrf"] = "1";
  const answer = await fetch("/api/v1/migrations", { method: "POST", headers,
    body: JSON.stringify({ vm: "small", to: "host-1" }) });
  return answer.status;
}"""


def test_a_migration_started_and_watched_in_the_dashboard(lab_dir: Path, tmp_path: Path) -> None:
    lab = Lab(lab_dir)
    lab.ok("lab", "up", "--hosts", "2", "--memory-per-host", "512M")
    lab.ok("vm", "create", "small", "--host", "host-1", "--memory", "128M", "--workload", SMALL)
    shots = Path(os.environ.get("VMFERRY_SCREENSHOTS") or tmp_path / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    with serving(lab_dir, tmp_path) as ready:
        tokens = {role: Path(p).read_text().strip() for role, p in ready["tokens"].items()}
        with _chromium() as browser:
            _operator_migrates(browser, ready["url"], tokens["operator"], shots)
        # (the CLI runs its own event loop: not beside Playwright's, which runs one too)
        [entry] = lab.ok("history")  # in-process, reading the lab's history
        assert (entry["vm"], entry["asked_by"]) == ("small", "api:operator")
        assert (entry["source"], entry["destination"]) == ("host-1", "host-2")
        with _chromium() as browser:
            _viewer_is_refused(browser, ready["url"], tokens["viewer"], shots)
        assert [v["host"] for v in lab.vms()] == ["host-2"]  # the viewer moved nothing


@contextmanager
def _chromium() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            yield browser
        finally:
            browser.close()


def _open(browser: Browser, url: str, token: str) -> tuple[BrowserContext, Page, list[str]]:
    """A fresh browser session logged in with ``token`` through the login form."""
    context = browser.new_context(ignore_https_errors=True, viewport={"width": 1280, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(f"{url}/")
    expect(page.locator("#login")).to_be_visible()
    page.fill("#token", token)
    page.click("#login-form button[type=submit]")
    expect(page.locator("#dashboard")).to_be_visible()
    expect(page.locator("#stream")).to_have_attribute("data-state", "live")
    expect(page.locator(".host")).to_have_count(2, timeout=15_000)
    [cookie] = [c for c in context.cookies() if c["name"] == "vmferry_session"]
    assert (cookie["httpOnly"], cookie["sameSite"], cookie["secure"]) == (True, "Strict", True)
    assert page.evaluate("document.cookie") == ""  # the page's scripts cannot read it
    return context, page, errors


def _operator_migrates(browser: Browser, url: str, token: str, shots: Path) -> None:
    context, page, errors = _open(browser, url, token)
    expect(page.locator("#whoami")).to_have_text("operator (operator)")
    expect(page.locator("tr[data-vm=small] td.where")).to_have_text("host-1")
    expect(page.locator(".host[data-host=host-1] .vms")).to_have_text("VMs: small")
    expect(page.locator(".host[data-host=host-1] .load .value").first).to_contain_text("of 512.0")
    page.screenshot(path=shots / "dashboard-overview.png", full_page=True)

    page.evaluate(_RECORDER)
    page.click("tr[data-vm=small] button.migrate")
    page.select_option("#migrate-to", "host-2")
    page.select_option("#migrate-strategy", "precopy")
    page.fill("#migrate-bandwidth", "250")  # Mbit/s: a few seconds to watch
    page.click("#migrate-form button[type=submit]")
    move = page.locator(".job .move[data-vm=small]")
    expect(move.locator(".live[data-phase=active]")).to_be_visible(timeout=MOVE_S * 1000)
    expect(move.locator(".live .stats")).to_contain_text(" sent, ")
    page.wait_for_function(  # a curve to show (the move may end first: then it goes on)
        "() => !document.querySelector('.live') ||"
        " Number(document.querySelector('.live svg.curve')?.dataset.points) >= 12",
        timeout=MOVE_S * 1000,
    )
    page.screenshot(path=shots / "live-move.png", full_page=True)

    report = move.locator(".report")
    expect(report).to_have_attribute("data-status", "completed", timeout=MOVE_S * 1000)
    for quantity in ("total time", "QEMU downtime", "guest-felt downtime", "transferred"):
        row = report.locator(f"tr[data-quantity='{quantity}']")
        for cell in ("predicted", "actual"):
            expect(row.locator(f"td.{cell}")).to_have_text(re.compile(r"^\d[\d.]* (ms|s|\w?i?B)$"))
    curve = report.locator("svg.curve")
    expect(curve.locator("path.transferred")).to_have_count(1)
    assert int(curve.get_attribute("data-points") or 0) >= 3
    expect(curve.locator(".predicted.total")).to_have_count(1)
    expect(curve.locator(".actual.total")).to_have_count(1)
    expect(page.locator(".job .badge.completed")).to_have_count(1)
    expect(page.locator("tr[data-vm=small] td.where")).to_have_text("host-2")
    expect(page.locator("#history tr[data-vm=small] td.asked-by")).to_have_text("api:operator")
    seen = page.evaluate("window.seen")
    assert "active" in seen["phases"], seen["phases"]
    assert any(re.fullmatch(r"ETA [\d.]+ m?s", eta) for eta in seen["etas"]), seen["etas"]
    report.scroll_into_view_if_needed()
    page.screenshot(path=shots / "finished-report.png", full_page=True)
    page.click(".host[data-host=host-2] button.evacuate")  # opened and closed: not run here
    expect(page.locator("#evacuate-form h3")).to_have_text("Evacuate host-2 (small)")
    page.click("#evacuate-form button[type=button]")
    expect(page.locator("#action")).to_be_hidden()
    assert errors == []

    page.click("#logout")
    expect(page.locator("#login")).to_be_visible()
    assert not [c for c in context.cookies() if c["name"] == "vmferry_session"]
    context.close()


def _viewer_is_refused(browser: Browser, url: str, token: str, shots: Path) -> None:
    context, page, errors = _open(browser, url, token)
    expect(page.locator("#whoami")).to_have_text("viewer (viewer)")
    expect(page.locator(".report[data-status=completed] svg.curve")).to_have_count(1)
    expect(page.locator("tr[data-vm=small] td.where")).to_have_text("host-2")
    for button in ("migrate", "evacuate", "cancel"):
        expect(page.locator(f"button.{button}")).to_have_count(0)
    assert page.evaluate(_POST_AS_PAGE, True) == 403  # the session cookie: a viewer's
    assert page.evaluate(_POST_AS_PAGE, False) == 401  # the cookie alone: no CSRF header
    answer = context.request.post(
        f"{url}/api/v1/migrations",
        headers={"Authorization": f"Bearer {token}"},
        data={"vm": "small", "to": "host-1"},
    )
    assert answer.status == 403
    assert answer.json()["error"]["code"] == "forbidden"
    page.screenshot(path=shots / "viewer.png", full_page=True)
    assert errors == []
    context.close()
