"""The admin page in headless Chromium (Debian's chromium driven by Playwright) against the running
stack: sign in, change a traffic split and see predictions follow it, watch a batch job reach 100%,
revoke an API key. Each main screen is saved as a PNG: to a temporary directory, so that a test run
writes nothing into the checkout; `AISTACK_UPDATE_SCREENSHOTS=1 pytest tests/e2e/test_admin_ui.py`
refreshes the committed ones in docs/screenshots/ (README's "Screenshots")."""
from __future__ import annotations

import os
import re
import secrets
import shutil
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.test_admin_api import fraud_csv, poll, row

CHROMIUM = os.environ.get("AISTACK_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
DOCS_SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not Path(CHROMIUM).exists(),
                       reason=f"no Chromium at {CHROMIUM}: `apt-get install -y chromium` (or set AISTACK_CHROMIUM)"),
]
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install playwright")
expect = sync_api.expect


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def screenshot_dir(tmp: Path) -> Path:
    """docs/screenshots/ only when asked to refresh them (AISTACK_UPDATE_SCREENSHOTS=1), else `tmp`."""
    return DOCS_SCREENSHOTS if os.environ.get("AISTACK_UPDATE_SCREENSHOTS") == "1" else tmp


@pytest.fixture(scope="module")
def page(browser, stack, tmp_path_factory):
    """One signed-in tab for the module (the tests run in file order, as an operator would)."""
    context = browser.new_context(base_url=stack.url("gateway"), viewport={"width": 1440, "height": 1000},
                                  accept_downloads=True)
    context.set_default_timeout(30_000)
    tab = context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    tab.errors = errors
    tab.screenshots = screenshot_dir(tmp_path_factory.mktemp("screenshots"))
    yield tab
    context.close()


def shot(page, name: str) -> None:
    page.screenshots.mkdir(parents=True, exist_ok=True)
    page.evaluate("document.getElementById('toast').hidden = true")
    page.screenshot(path=str(page.screenshots / f"{name}.png"), full_page=True)


def test_sign_in(page, stack):
    page.goto("/admin/")
    expect(page.get_by_test_id("sign-in")).to_be_visible()
    page.get_by_test_id("email").fill(stack.admin_email)
    page.get_by_test_id("password").fill("not-the-password")
    page.get_by_test_id("sign-in").click()
    expect(page.get_by_test_id("signin-error")).to_contain_text("wrong email or password")
    shot(page, "signin")
    page.get_by_test_id("password").fill(stack.admin_password)
    page.get_by_test_id("sign-in").click()
    expect(page.get_by_test_id("who")).to_have_text(stack.admin_email)
    expect(page.get_by_test_id("services")).to_contain_text("orchestrator")
    assert page.errors == []


def test_overview_shows_every_service_and_live_traffic(page, stack, admin_headers):
    with httpx.Client(base_url=stack.url("gateway"), headers=admin_headers, timeout=30) as c:
        def traffic():  # some predictions, about half of them cache hits, over a few scrapes
            for i in range(20):
                assert c.post("/v1/predict/fraud", json={"inputs": row(1000 + i % 10)}).status_code == 200
            series = c.get("/admin/overview").json()["traffic"]["series"]
            return sum(1 for p in series[-6:] if p["cache_hit_ratio"] and p["p95_ms"]) >= 4
        poll(traffic, "a few scrapes with traffic and cache hits", every=2.0)
    page.goto("/admin/#/overview")
    services = page.get_by_test_id("services")
    for name in ("gateway", "auth", "orchestrator", "model", "features", "pipeline"):  # refreshed every 5 s
        expect(services.locator(f"tr[data-service={name}] [data-testid=status]").first).to_have_text(
            "ready", timeout=60_000)
    # The page refreshes itself every few seconds: wait for the traffic to reach the charts.
    expect(page.get_by_test_id("kpi-cache")).not_to_have_text(re.compile(r"^–"), timeout=60_000)
    expect(page.get_by_test_id("chart-rps").locator("path.line")).to_have_count(1)
    expect(page.get_by_test_id("chart-latency").locator("path.line")).to_have_count(2)
    expect(page.get_by_test_id("models").locator("tr[data-model=fraud]")).to_be_visible()
    shot(page, "overview")


def _versions_served(gw: str, headers: dict, n: int = 5) -> set[str]:
    served = set()
    for i in range(n):
        r = httpx.post(f"{gw}/v1/predict/fraud", json={"inputs": row(2000 + i)}, headers=headers, timeout=30)
        assert r.status_code == 200, r.text
        served.add(r.json()["version"])
    return served


def test_traffic_split_changes_what_predictions_use(page, stack, admin_headers):
    gw = stack.url("gateway")
    original = httpx.get(f"{gw}/admin/models/fraud/policy", headers=admin_headers, timeout=30).json()["policy"]
    try:
        page.goto("/admin/#/models/fraud")
        expect(page.get_by_test_id("quality")).to_be_visible()
        # A/B weights: everything to v1.
        page.get_by_test_id("weight-1").fill("100")
        page.get_by_test_id("weight-2").fill("0")
        page.get_by_test_id("reason").fill("browser test: all to v1")
        page.get_by_test_id("apply-weights").click()
        expect(page.get_by_test_id("current-routes")).to_have_text("v1: 100")
        poll(lambda: _versions_served(gw, admin_headers) == {"1"}, "predictions from v1")
        # Blue/green switch to v2.
        page.get_by_test_id("switch-2").click()
        expect(page.get_by_test_id("current-routes")).to_have_text("v2: 100")
        poll(lambda: _versions_served(gw, admin_headers) == {"2"}, "predictions from v2")
        # A canary, then roll it back from the history.
        page.get_by_test_id("canary-form").locator("select[name=stable]").select_option("1")
        page.get_by_test_id("canary-form").locator("select[name=canary]").select_option("2")
        page.get_by_test_id("canary-percent").fill("20")
        page.get_by_test_id("apply-canary").click()
        expect(page.get_by_test_id("current-routes")).to_have_text("v1: 80 · v2: 20")
        expect(page.get_by_test_id("traffic-bar").locator(".seg")).to_have_count(2)
        shot(page, "models")
        page.get_by_test_id("rollback").click()
        expect(page.get_by_test_id("current-routes")).to_have_text("v2: 100")
        poll(lambda: _versions_served(gw, admin_headers) == {"2"}, "predictions from v2 after the rollback")
        assert page.errors == []
    finally:
        httpx.put(f"{gw}/admin/models/fraud/policy", json={"policy": original, "reason": "restore after ui test"},
                  headers=admin_headers, timeout=30)


def test_batch_job_progress_reaches_100_and_downloads(page, tmp_path):
    data = tmp_path / "transactions.csv"
    data.write_bytes(fraud_csv(4000, 31))
    page.goto("/admin/#/jobs")
    page.get_by_test_id("job-file").set_input_files(str(data))
    page.get_by_test_id("job-model").select_option("fraud")
    page.get_by_test_id("job-chunk-rows").fill("250")
    with page.expect_response(lambda r: r.url.endswith("/v1/jobs/batch-inference")) as submitted:
        page.get_by_test_id("submit-job").click()
    assert submitted.value.status == 202
    job_id = submitted.value.json()["id"]
    job_row = page.locator(f"tr[data-job='{job_id}']")
    expect(job_row).to_be_visible()
    bar = job_row.get_by_test_id("progress")
    expect(bar).to_have_attribute("aria-valuenow", "100", timeout=120_000)
    expect(job_row.get_by_test_id("status")).to_have_text("succeeded")
    expect(bar).to_contain_text("4000 / 4000 rows")
    shot(page, "jobs")
    with page.expect_download() as download:
        job_row.get_by_test_id("download").click()
    saved = tmp_path / "result.csv"
    download.value.save_as(saved)
    lines = saved.read_text().strip().splitlines()
    assert len(lines) == 4001 and "probability_1" in lines[0]
    assert page.errors == []


def test_create_and_revoke_an_api_key(page, stack):
    gw = stack.url("gateway")
    name = f"ui-{secrets.token_hex(4)}"
    page.goto("/admin/#/access")
    page.get_by_test_id("key-name").fill(name)
    page.get_by_test_id("key-role").select_option("service")
    page.get_by_test_id("key-scopes").fill("predict")
    page.get_by_test_id("create-key").click()
    key = page.get_by_test_id("new-key-value").inner_text().strip()
    assert key.startswith("ak_")
    headers = {"X-API-Key": key}
    assert httpx.post(f"{gw}/v1/predict/fraud", json={"inputs": row(1)}, headers=headers, timeout=30).status_code == 200

    key_row = page.locator(f"tr[data-name='{name}']")
    expect(key_row.get_by_test_id("status")).to_have_text("active")
    page.get_by_test_id("new-key-value").evaluate("el => el.textContent = 'ak_••••••••••••'")  # not in docs/
    shot(page, "access")
    key_row.get_by_test_id("revoke").click()
    expect(key_row.get_by_test_id("revoke")).to_have_text("Confirm revoke")
    key_row.get_by_test_id("revoke").click()
    expect(key_row.get_by_test_id("status")).to_have_text("revoked")
    # Gateways accept a revoked key until their introspection cache entry expires: poll, no timing.
    deadline = time.monotonic() + 120
    while (r := httpx.post(f"{gw}/v1/predict/fraud", json={"inputs": row(1)}, headers=headers,
                           timeout=30)).status_code == 200:
        assert time.monotonic() < deadline, "the revoked key still works"
        time.sleep(1)
    assert r.status_code == 401
    assert page.errors == []


def test_sign_out(page):
    page.goto("/admin/#/overview")
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_test_id("sign-in")).to_be_visible()
    page.reload()
    expect(page.get_by_test_id("sign-in")).to_be_visible()  # the session is gone, not just hidden
