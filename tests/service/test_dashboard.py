"""The dashboard in a real headless browser (Debian's chromium driven by selenium through chromium-driver)
against `cmim serve` on its embedded default (SQLite + local worker: test_e2e's `embedded` fixture), with
no route to the internet: the browser's proxy leads nowhere and only loopback is reached directly.

A missing browser fails these tests (`.ci/run` installs it); each page is saved to docs/screenshots/.
"""

from __future__ import annotations

import http.server
import json
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from test_e2e import Stack, embedded, free_port, make_key  # noqa: F401 - embedded: a fixture
from test_enforcement import attack, replay
from test_predict_scale import v2_body

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
SHOTS = Path(__file__).parents[2] / "docs" / "screenshots"
# The quick preset shrunk to seconds, with enough teacher epochs to watch the progress move.
TINY_OVERRIDES = {
    "teacher": {"dataset_params": {"num_train": 1000, "num_test": 500}},
    "audit": {"attacks": ["hard_label"], "ls_eps": [0.0], "ls_mixup": False, "query_budgets": [500]},
}


@pytest.fixture(scope="module")
def server(request: pytest.FixtureRequest) -> Stack:
    """`cmim serve` on SQLite, with its first key: test_e2e's fixture."""
    return request.getfixturevalue("embedded")


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    missing = [p for p in (CHROMIUM, DRIVER) if shutil.which(p) is None]
    if missing:
        pytest.fail(f"no {' or '.join(missing)}: apt-get install -y chromium chromium-driver (.ci/run does)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-dev-shm-usage",
        "--window-size=1200,900",
        # No internet: every request goes to a proxy that is not there; loopback is reached directly.
        f"--proxy-server=http://127.0.0.1:{free_port()}",
        "--proxy-bypass-list=127.0.0.1;localhost",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=DRIVER))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(condition: Callable[[], Any], timeout: float = 20, what: str = "the page") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = condition()
        except (WebDriverException, StaleElementReferenceException):
            value = None
        if value:
            return value
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


def text(driver: WebDriver, css: str) -> str:
    """The element's text once the page that has it is loaded (a click may still be navigating)."""
    return wait_for(lambda: (driver.find_element(By.CSS_SELECTOR, css).text,), what=css)[0]


def shot(driver: WebDriver, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(SHOTS / f"{name}.png"))


def sign_in(driver: WebDriver, base: str, key: str) -> None:
    driver.get(f"{base}/login")
    driver.find_element(By.ID, "key").send_keys(key)
    driver.find_element(By.ID, "sign-in").click()
    wait_for(  # signed in (off the sign-in page) or refused (the error shown)
        lambda: "/login" not in driver.current_url or driver.find_elements(By.ID, "error"), what="sign-in"
    )


def local_only(driver: WebDriver, base: str) -> None:
    """Everything the page loaded came from the server itself."""
    urls = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert all(u.startswith(base) for u in urls), urls


def test_dashboard_sign_in_submit_watch_report_keys_sign_out(server: Stack, browser: WebDriver) -> None:
    base, d = server.base, browser
    # A wrong key: the sign-in page says why.
    sign_in(d, base, "cmim_not-a-key")
    assert "unknown or revoked API key" in text(d, "#error")
    shot(d, "sign-in-error")

    sign_in(d, base, server.key)
    wait_for(lambda: d.current_url == f"{base}/jobs", what="the jobs page")
    # Submit the quick preset, shrunk by the form's overrides.
    d.find_element(By.CSS_SELECTOR, "input[name=preset][value=quick]").click()
    d.find_element(By.ID, "teacher_epochs").send_keys("12")
    d.find_element(By.ID, "seeds").send_keys("1")
    d.find_element(By.ID, "audit_epochs").send_keys("2")
    d.find_element(By.ID, "overrides").send_keys(json.dumps(TINY_OVERRIDES))
    shot(d, "jobs-submit")
    d.find_element(By.ID, "submit-job").click()
    wait_for(lambda: "/jobs/" in d.current_url, what="the job page")
    job_id = d.current_url.rsplit("/", 1)[1]
    assert text(d, "#indicative").startswith("indicative")

    # Watch the progress move, pushed over the event stream, until the page shows the report.
    seen: set[str] = set()
    stages: set[str] = set()

    def finished() -> bool:
        table = d.find_element(By.ID, "progress-table")
        seen.add(table.get_attribute("data-fraction"))
        stages.add(text(d, "#job-stage"))
        if len(seen) == 3:
            shot(d, "job-running")
        return table.get_attribute("data-status") == "succeeded" and bool(d.find_elements(By.ID, "report"))

    wait_for(finished, timeout=150, what="the job to succeed")
    moving = {f for f in seen if f and 0 < float(f) < 1}
    assert len(moving) >= 2, f"the progress never moved on the page: {seen}, stages {stages}"
    assert {"teacher", "audit"} & stages, stages
    shot(d, "job-done")

    # The report opens with the session cookie alone.
    assert d.find_element(By.ID, "report-link").get_attribute("href").endswith(f"/jobs/{job_id}/report.html")
    d.get(f"{base}/api/v1/jobs/{job_id}/report.html")
    wait_for(lambda: "verdict" in d.page_source.lower(), what="the report")
    shot(d, "report")
    d.get(f"{base}/api/v1/jobs/{job_id}")
    assert json.loads(d.find_element(By.TAG_NAME, "body").text)["progress"]["fraction"] == 1.0

    # The model: serving, budgets per key, and a prediction on two rows.
    d.get(f"{base}/models?id={job_id}")
    assert text(d, "#output-mode") == "labels only"  # the quick preset serves as every job does by default
    assert d.find_elements(By.CSS_SELECTOR, "#budgets tbody tr")
    d.find_element(By.ID, "inputs").send_keys(json.dumps([[[0.1] * 40], [[-0.3] * 40]]))
    d.find_element(By.ID, "predict").click()
    labels = [e.text for e in wait_for(lambda: d.find_elements(By.CSS_SELECTOR, "#predictions .label"))]
    assert len(labels) == 2 and all(label.isdigit() for label in labels), labels
    shot(d, "models")

    # Enforcement: an extraction replayed over four keys is suspended; the review list shows it, and
    # reinstating a key there lets it answer again.
    made = [server.post("/api/v1/keys", json={"name": f"client {i}"}).json() for i in range(4)]
    keys = [{"Authorization": f"Bearer {k['key']}"} for k in made]
    refused: dict[int, dict[str, Any]] = {}

    def infer(_: int, k: int, x: Any) -> httpx.Response:
        return httpx.post(f"{base}/v2/models/{job_id}/infer", json=v2_body(x), headers=keys[k], timeout=30)

    replay(infer, 4, attack(4000), lambda: any(p["status"] == 403 for p in refused.values()), refused)
    k = next(k for k, p in refused.items() if p["status"] == 403)
    d.get(f"{base}/models/{job_id}/enforcement")
    row = f"tr[data-key='{made[k]['id']}']"
    assert text(d, f"{row} .standing") == "suspended" and refused[k]["alert_id"] in text(d, row)
    shot(d, "enforcement")
    d.find_element(By.CSS_SELECTOR, f"{row} button.reinstate").click()
    wait_for(lambda: "reinstate" in text(d, "#actions") and not d.find_elements(By.CSS_SELECTOR, row))
    again = httpx.post(
        f"{base}/api/v1/models/{job_id}/predict", json={"inputs": [[[0.2] * 40]]}, headers=keys[k]
    )
    # the suspension is lifted: it answers, unless the replay spent the key's whole budget before the
    # monitor acted (its counts reach the predict path within a second): then the budget's own 429
    if again.status_code != 200:
        problem = again.json()
        assert problem["type"] == "urn:cmim:problem:query-budget-exhausted", again.text
        assert problem["budget"]["used"] == problem["budget"]["limit"], again.text

    # Keys: create a predict-only key with a budget (its secret shown once), then revoke it.
    d.get(f"{base}/keys")
    d.find_element(By.ID, "key-name").send_keys("shop")
    d.find_element(By.ID, "key-budget").send_keys("500")
    d.find_element(By.ID, "create-key").click()
    secret = text(d, "#new-secret")
    assert secret.startswith("cmim_")
    row = d.find_element(By.XPATH, "//tr[td[1][text()='shop']]")
    assert "models:predict" in row.text and "500" in row.text
    row.find_element(By.CSS_SELECTOR, "button.revoke").click()
    cell = "//tr[td[1][text()='shop']]//td[@class='revoked']"
    assert wait_for(lambda: d.find_element(By.XPATH, cell).text, what="the key revoked")
    me = httpx.get(f"{base}/api/v1/keys/me", headers={"Authorization": f"Bearer {secret}"})
    assert me.status_code == 401
    shot(d, "keys")

    d.get(f"{base}/compare?a={job_id}&b={job_id}")
    assert "margin" in text(d, "#comparison")
    shot(d, "compare")
    d.get(f"{base}/jobs")
    wait_for(lambda: d.find_elements(By.CSS_SELECTOR, f"tr[data-job='{job_id}'] .verdict"), what="a verdict")
    shot(d, "jobs")
    local_only(d, base)

    d.find_element(By.ID, "sign-out").click()
    wait_for(lambda: d.current_url.startswith(f"{base}/login"), what="the sign-in page")
    d.get(f"{base}/jobs")
    assert d.current_url.startswith(f"{base}/login")


def test_another_owners_job_is_the_404_page(server: Stack, browser: WebDriver) -> None:
    other = make_key(server.env, "other owner")
    r = httpx.post(
        f"{server.base}/api/v1/jobs",
        json={"preset": "quick"},
        headers={"Authorization": f"Bearer {other}"},
        timeout=30,
    )
    assert r.status_code == 202, r.text
    theirs = r.json()["id"]
    httpx.post(f"{server.base}/api/v1/jobs/{theirs}/cancel", headers={"Authorization": f"Bearer {other}"})
    sign_in(browser, server.base, server.key)
    browser.get(f"{server.base}/jobs/{theirs}")
    assert "404" in text(browser, "#error-title") and theirs in text(browser, "#error")
    shot(browser, "not-found")
    browser.get(f"{server.base}/api/v1/jobs/{theirs}/report.html")
    assert "404" in browser.page_source and "no job with id" in browser.page_source


def test_revoking_the_key_ends_its_session(server: Stack, browser: WebDriver) -> None:
    r = server.post("/api/v1/keys", json={"name": "reader", "scopes": ["jobs:read"]})
    assert r.status_code == 201, r.text
    sign_in(browser, server.base, r.json()["key"])
    wait_for(lambda: browser.current_url == f"{server.base}/jobs", what="the jobs page")
    revoke = httpx.delete(f"{server.base}/api/v1/keys/{r.json()['id']}", headers=server.headers)
    assert revoke.status_code == 204
    browser.get(f"{server.base}/jobs")
    assert browser.current_url.startswith(f"{server.base}/login")
    assert "revoked" in text(browser, "#error")


class AttackerPage(http.server.BaseHTTPRequestHandler):
    """Another origin (another port) whose page posts a form to the dashboard, token included."""

    target = ""
    csrf = ""

    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        page = (
            f'<form id="f" method="post" action="{self.target}/keys">'
            f'<input name="csrf" value="{self.csrf}"><input name="name" value="evil"></form>'
            "<script>document.getElementById('f').submit()</script>"
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(page)))
        self.end_headers()
        self.wfile.write(page)

    def log_message(self, *args: Any) -> None:
        pass


def test_a_cross_site_form_post_is_refused(server: Stack, browser: WebDriver) -> None:
    sign_in(browser, server.base, server.key)
    browser.get(f"{server.base}/keys")
    AttackerPage.target = server.base
    AttackerPage.csrf = browser.find_element(By.NAME, "csrf").get_attribute("value")  # even a leaked token
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Threads: the browser may hold an idle (pre)connection open, which would block a one-thread server.
    attacker = http.server.ThreadingHTTPServer(("127.0.0.1", port), AttackerPage)
    attacker.daemon_threads = True
    threading.Thread(target=attacker.serve_forever, daemon=True).start()
    try:
        browser.get(f"http://127.0.0.1:{port}/")
        wait_for(lambda: browser.current_url.startswith(f"{server.base}/keys"), what="the cross-site post")
        assert "403" in text(browser, "#error-title")
        shot(browser, "cross-site-refused")
    finally:
        attacker.shutdown()
    names = [k["name"] for k in server.get("/api/v1/keys").json()["items"]]
    assert "evil" not in names


def test_api_docs_render_their_operations_offline(server: Stack, browser: WebDriver) -> None:
    browser.get(f"{server.base}/docs")
    ops = wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, ".opblock"), what="the API operations")
    assert len(ops) >= 20
    presets = "//*[contains(@class, 'opblock-summary-path')][contains(., '/api/v1/presets')]"
    assert browser.find_elements(By.XPATH, presets)
    local_only(browser, server.base)
    shot(browser, "api-docs")
