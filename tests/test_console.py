"""The /admin console in a real browser: sign-in, live pages, enrollment, approval, revocation.

A real broker (hypercorn), real connectors (subprocesses), the fake LLM, and Debian's
headless Chromium driven by selenium. A screenshot of every page lands in the test's
directory (and in $REMOTELLM_SCREENSHOTS).
"""

import json
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trustme
from selenium import webdriver
from selenium.webdriver.common.by import By

from tests.browser import browser, chromium, screenshot, sign_in, text, wait_for
from tests.proxies import Proxies
from tests.support import BrokerHandle, Proc, Stack, free_port, wait_until
from tests.test_proxies import proxies
from tests.test_tls import ca, trusting
from wire import FRAMES_CONTENT_TYPE, REGISTER_PATH, Hello, encode

# A browser's pages do not change with the Python that serves them: once per tox run.
pytestmark = pytest.mark.slow

__all__ = ["browser", "ca", "proxies"]  # fixtures

ADMIN = "sk-admin-console"
USER = "sk-user"
CONFIG = f"""
admin_api_keys: [{ADMIN}]
connectors:
  - name: yaml-box
    token: ct-yaml
    models: [m-yaml]
"""
PAGE_UPDATE = 2.0  # a live page shows a change within this (it refreshes every second)
REVOKED_WITHIN = 2.0  # a revoked connector's tunnels close within this
APPROVED_WITHIN = 60.0  # a pending connector retries with backoff (capped at 30 s)
START = 30.0  # a process to start, on a busy machine


def enroll(stack: Stack, broker: BrokerHandle, code: str, llm: str, credentials: Path, name: str) -> Proc:
    args = [sys.executable, "-m", "connector", "--enroll", code, "--credentials-file", str(credentials),
            "--broker-url", broker.url, "--llm-url", llm]  # fmt: skip
    return stack.spawn(name, args)


def from_file(stack: Stack, broker: BrokerHandle, credentials: Path, llm: str, name: str) -> Proc:
    args = [sys.executable, "-m", "connector", "--credentials-file", str(credentials),
            "--broker-url", broker.url, "--llm-url", llm]  # fmt: skip
    return stack.spawn(name, args)


def connected_names(driver: webdriver.Chrome) -> list[str]:
    return [
        row.get_attribute("data-connector") or ""
        for row in driver.find_elements(By.CSS_SELECTOR, "#connectors tbody tr")
    ]


def row_of(driver: webdriver.Chrome, name: str) -> str:
    return str(driver.find_element(By.CSS_SELECTOR, f'#connectors tr[data-connector="{name}"]').text)


def enrolled_state(driver: webdriver.Chrome, name: str) -> str:
    rows = driver.find_elements(By.CSS_SELECTOR, f'#enrolled tr[data-enrolled="{name}"]')
    return (rows[0].get_attribute("data-state") or "") if rows else ""


def chat(broker: BrokerHandle, model: str) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "a secret prompt"}]}
    return httpx.post(
        broker.url + "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {USER}"}, timeout=10
    )


def test_live_pages_show_connectors_models_usage_and_requests(
    stack: Stack, browser: webdriver.Chrome, tmp_path: Path
) -> None:
    broker = stack.broker(CONFIG, user_keys=(USER,), env={"REMOTELLM_PING_INTERVAL": "1"})  # round trips soon
    llm = stack.llm("m-yaml")
    browser.get(broker.url + "/admin")
    screenshot(browser, tmp_path, "01-login")
    sign_in(browser, broker.url, USER)  # a user key is not an admin key
    wait_for(browser, lambda d: "not an admin key" in text(d, "#login-error"), 10, "the refusal")
    screenshot(browser, tmp_path, "02-login-refused")
    sign_in(browser, broker.url, ADMIN)
    wait_for(browser, lambda d: d.current_url.endswith("/admin/connectors"), 10, "the connectors page")
    cookie = browser.get_cookie("remotellm_console")
    assert cookie is not None and cookie["httpOnly"] and cookie["sameSite"] == "Strict" and not cookie["secure"]
    assert ADMIN not in browser.page_source
    assert browser.find_elements(By.ID, "no-connectors")

    connector = stack.connector(broker.url, "ct-yaml", llm, "m-yaml")
    wait_until(lambda: "tunnel up" in connector.log(), timeout=START, what="the tunnel")
    wait_for(browser, lambda d: "HTTP/2" in row_of(d, "yaml-box"), PAGE_UPDATE, "the connector on the page")
    assert "m-yaml" in row_of(browser, "yaml-box") and "0 / " in row_of(browser, "yaml-box")
    assert "connected" in text(browser, "#history")
    wait_for(
        browser, lambda d: " ms" in d.find_element(By.CSS_SELECTOR, "#connectors tbody tr").text, 10, "a round trip"
    )
    screenshot(browser, tmp_path, "03-connectors")

    browser.get(broker.url + "/admin/usage")
    chart = browser.find_element(By.ID, "chart-by_model")
    wait_for(browser, lambda d: chart.get_attribute("data-total") == "0", 10, "the empty usage chart")
    assert browser.find_elements(By.CSS_SELECTOR, "#chart-by_model canvas")
    for _ in range(3):
        assert chat(broker, "m-yaml").status_code == 200
    wait_for(browser, lambda d: int(chart.get_attribute("data-total") or 0) > 0, 15, "the chart to count the tokens")
    wait_for(browser, lambda d: "(unnamed)" in text(d, "#top"), 10, "the top consumers")
    screenshot(browser, tmp_path, "04-usage")
    browser.find_element(By.LINK_TEXT, "Last day, per hour").click()
    wait_for(browser, lambda d: "range=day" in d.find_element(By.ID, "live").get_attribute("data-live"), 10, "a day")
    wait_for(
        browser, lambda d: int(d.find_element(By.ID, "chart-by_user").get_attribute("data-total") or 0) > 0, 10, "a day"
    )
    screenshot(browser, tmp_path, "04-usage-day")

    browser.get(broker.url + "/admin/models")
    row = wait_for(
        browser, lambda d: d.find_element(By.CSS_SELECTOR, '#models tr[data-model="m-yaml"]').text, 10, "m-yaml"
    )
    assert "yaml-box" in row and " 3 " in f" {row} "
    screenshot(browser, tmp_path, "05-models")

    browser.get(broker.url + "/admin/live")
    wait_for(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#feed tbody tr")) == 3, 10, "three requests")
    assert chat(broker, "m-yaml").status_code == 200
    wait_for(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#feed tbody tr")) == 4, 10, "the fourth, live")
    assert "200" in text(browser, "#feed") and "a secret prompt" not in browser.page_source
    assert "tok0" not in browser.page_source  # the fake LLM's answer
    screenshot(browser, tmp_path, "06-live")

    browser.get(broker.url + "/admin/no-such-page")
    assert "404" in browser.find_element(By.TAG_NAME, "h1").text
    screenshot(browser, tmp_path, "07-not-found")

    browser.get(broker.url + "/admin/connectors")
    browser.find_element(By.CSS_SELECTOR, ".logout button").click()
    wait_for(browser, lambda d: d.find_elements(By.ID, "key"), 10, "the sign-in page")
    stolen = httpx.get(broker.url + "/admin/api/connectors", cookies={"remotellm_console": cookie["value"]})
    assert stolen.status_code == 401  # signed out everywhere, not only in this browser


def test_enroll_approve_and_revoke_from_the_console(stack: Stack, browser: webdriver.Chrome, tmp_path: Path) -> None:
    broker = stack.broker(CONFIG + "require_approval: true\n", user_keys=(USER,))
    llm = stack.llm("m-new")
    sign_in(browser, broker.url, ADMIN)
    wait_for(browser, lambda d: d.current_url.endswith("/admin/connectors"), 10, "the connectors page")
    browser.get(broker.url + "/admin/enroll")
    screenshot(browser, tmp_path, "08-enroll")
    browser.find_element(By.ID, "name").send_keys("box-new")
    browser.find_element(By.ID, "models").send_keys("m-new")
    browser.find_element(By.CSS_SELECTOR, "#enroll button[type=submit]").click()
    code = wait_for(browser, lambda d: text(d, "#code"), 10, "the code")
    assert code.startswith("rle_") and code in text(browser, "#command")
    screenshot(browser, tmp_path, "09-enroll-code")

    credentials = tmp_path / "box-new.json"
    connector = enroll(stack, broker, code, llm, credentials, "connector-new")
    wait_until(lambda: "awaits an admin's approval" in connector.log(), timeout=START, what="the pending refusal")
    assert stat.S_IMODE(credentials.stat().st_mode) == 0o600
    browser.get(broker.url + "/admin/connectors")
    wait_for(browser, lambda d: enrolled_state(d, "box-new") == "pending", PAGE_UPDATE, "box-new pending")
    assert connected_names(browser) == []
    screenshot(browser, tmp_path, "10-pending")

    again = httpx.post(broker.url + "/tunnel/v1/enroll", json={"code": code})
    assert again.status_code == 401 and again.json()["error"]["code"] == "invalid_code"  # one use

    browser.find_element(By.CSS_SELECTOR, '#enrolled tr[data-enrolled="box-new"] button[name=approve]').click()
    wait_for(browser, lambda d: connected_names(d) == ["box-new"], APPROVED_WITHIN, "box-new connected")
    assert enrolled_state(browser, "box-new") == "approved"
    assert chat(broker, "m-new").status_code == 200
    screenshot(browser, tmp_path, "11-approved")

    # Later starts need only the file; and a copy of it (stolen) works as well, until revoked.
    connector.stop()
    wait_for(browser, lambda d: connected_names(d) == [], 15, "the stopped connector to leave")
    stolen = tmp_path / "stolen.json"
    shutil.copy(credentials, stolen)
    first = from_file(stack, broker, credentials, llm, "connector-file")
    thief = from_file(stack, broker, stolen, llm, "connector-thief")
    for proc in (first, thief):
        wait_until(lambda proc=proc: "tunnel up" in proc.log(), timeout=START, what=f"{proc.name} up")
    wait_for(browser, lambda d: connected_names(d) == ["box-new", "box-new"], PAGE_UPDATE, "both tunnels")

    browser.find_element(By.CSS_SELECTOR, '#enrolled tr[data-enrolled="box-new"] button[name=revoke]').click()
    wait_until(lambda: broker.health()["connectors"] == 0, timeout=REVOKED_WITHIN, interval=0.05, what="tunnels closed")
    wait_for(
        browser,
        lambda d: connected_names(d) == [] and enrolled_state(d, "box-new") == "revoked",
        PAGE_UPDATE,
        "revoked",
    )
    assert chat(broker, "m-new").status_code in (404, 503)
    wait_until(lambda: "register answered 401" in thief.log(), timeout=START, what="the thief refused")
    screenshot(browser, tmp_path, "12-revoked")


def test_a_forged_form_post_is_refused(stack: Stack, browser: webdriver.Chrome, tmp_path: Path) -> None:
    broker = stack.broker(CONFIG + "require_approval: true\n", user_keys=(USER,))
    code = make_code(tmp_path / "broker-usage.db", "forged")  # (the database Stack gives the broker)
    answer = httpx.post(broker.url + "/tunnel/v1/enroll", json={"code": code})
    assert answer.status_code == 200 and answer.json()["state"] == "pending"
    sign_in(browser, broker.url, ADMIN)
    wait_for(browser, lambda d: enrolled_state(d, "forged") == "pending", 10, "the pending connector")
    # A page elsewhere posting to the console, with the browser's cookie but without the token:
    forge = """const form = document.createElement('form'); form.method = 'post';
        form.action = '/admin/connectors/forged/approve'; document.body.appendChild(form); form.submit();"""
    browser.execute_script(forge)
    wait_for(browser, lambda d: "403" in d.find_element(By.TAG_NAME, "h1").text, 10, "the refusal")
    assert "not from this console session" in text(browser, "#error-message")
    screenshot(browser, tmp_path, "13-forged-post-refused")
    browser.get(broker.url + "/admin/connectors")
    assert enrolled_state(browser, "forged") == "pending"
    cookie = browser.get_cookie("remotellm_console")
    assert cookie is not None
    wrong = httpx.post(broker.url + "/admin/connectors/forged/approve", data={"csrf": "guess"},
                       cookies={"remotellm_console": cookie["value"]})  # fmt: skip
    assert wrong.status_code == 403
    bad = httpx.post(broker.url + "/admin/enroll", data={"csrf": _csrf(browser), "name": "no spaces allowed"},
                     cookies={"remotellm_console": cookie["value"]})  # fmt: skip
    assert bad.status_code == 400 and "connector name" in bad.text
    browser.get(broker.url + "/admin/connectors")
    assert enrolled_state(browser, "forged") == "pending"


def _csrf(driver: webdriver.Chrome) -> str:
    return str(driver.find_element(By.CSS_SELECTOR, ".logout input[name=csrf]").get_attribute("value"))


def make_code(database: Path, name: str, ttl: str = "600") -> str:
    """``python -m broker enroll``'s code: the last line of its output."""
    result = subprocess.run(
        [sys.executable, "-m", "broker", "enroll", "--name", name, "--ttl", ttl, "--database", str(database)],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return result.stdout.strip().splitlines()[-1]


def test_the_cookie_is_secure_under_tls(stack: Stack, tmp_path: Path, ca: trustme.CA) -> None:
    cert = ca.issue_cert("127.0.0.1")
    certfile, keyfile = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(certfile))
    cert.private_key_pem.write_to_path(str(keyfile))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    port = free_port()
    args = [sys.executable, "-m", "broker", "--port", str(port), "--admin-api-key", ADMIN,
            "--certfile", str(certfile), "--keyfile", str(keyfile)]  # fmt: skip
    proc = stack.spawn("broker-tls", args)
    url = f"https://127.0.0.1:{port}"
    wait_until(lambda: httpx.get(url + "/health", verify=trusting(tmp_path), timeout=1), what="the TLS broker")
    driver = chromium(tmp_path / "profile", ignore_certificate_errors=True)
    try:
        sign_in(driver, url, ADMIN)
        wait_for(driver, lambda d: d.current_url.endswith("/admin/connectors"), 10, "the connectors page")
        cookie = driver.get_cookie("remotellm_console")
        assert cookie is not None and cookie["secure"] and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    finally:
        driver.quit()
    assert proc.alive
    assert ADMIN not in proc.log() and cookie["value"] not in proc.log()


def test_rotating_a_credential_keeps_the_tunnel_and_retires_the_old_one(
    stack: Stack, browser: webdriver.Chrome, tmp_path: Path
) -> None:
    broker = stack.broker(CONFIG, user_keys=(USER,))
    llm = stack.llm("m-rot")
    code = make_code(tmp_path / "broker-usage.db", "box-rot")
    credentials = tmp_path / "rot.json"
    connector = enroll(stack, broker, code, llm, credentials, "connector-rot")
    old = credentials.read_text() if wait_until(credentials.exists, timeout=START, what="the file") else ""
    sign_in(browser, broker.url, ADMIN)
    wait_for(browser, lambda d: connected_names(d) == ["box-rot"], START, "box-rot connected")
    browser.find_element(By.CSS_SELECTOR, '#enrolled tr[data-enrolled="box-rot"] button[name=rotate]').click()
    wait_until(lambda: "credential rotated" in connector.log(), timeout=START, what="the rotation")
    wait_until(lambda: "no longer works" in broker.proc.log(), timeout=START, what="the old credential retired")
    assert credentials.read_text() != old and stat.S_IMODE(credentials.stat().st_mode) == 0o600
    assert broker.proc.log().count("registered") == 1 and "dropped" not in broker.proc.log()  # the same tunnel
    assert chat(broker, "m-rot").status_code == 200
    old_credential = json.loads(old)["credential"]
    refused = httpx.post(broker.url + "/tunnel/v1/register", headers={"authorization": f"Bearer {old_credential}"})
    assert refused.status_code == 401
    wait_for(
        browser, lambda d: "Rotate credential" in text(d, '#enrolled tr[data-enrolled="box-rot"]'), PAGE_UPDATE, "done"
    )
    screenshot(browser, tmp_path, "14-rotated")
    assert old_credential not in broker.proc.log() and old_credential not in connector.log()


def test_the_console_names_the_proxy_a_connector_came_through(stack: Stack, proxies: Proxies) -> None:
    broker = stack.broker(CONFIG, user_keys=(USER,))
    squid = proxies.squid()
    args = ["--broker-url", broker.url, "--token", "ct-yaml", "--llm-url", stack.llm("m-yaml"), "--proxy", squid.url]
    stack.spawn("connector", [sys.executable, "-m", "connector", *args])
    broker.wait_models("m-yaml", timeout=START)
    admin = {"authorization": f"Bearer {ADMIN}"}
    (row,) = httpx.get(broker.url + "/admin/api/connectors", headers=admin).json()["connectors"]
    assert "squid" in row["proxy"] and row["transport"].startswith("HTTP/1.1")
    # What a proxy (or anyone) writes in Via is shown as text, never as markup.
    hostile = '<img src=x id="injected">'
    hello = encode(Hello("hostile-1", "0", ["m-yaml"]))
    headers = {"authorization": "Bearer ct-yaml", "via": hostile, "content-type": FRAMES_CONTENT_TYPE}
    assert httpx.post(broker.url + REGISTER_PATH, content=hello, headers=headers).status_code == 200
    with httpx.Client() as client:
        client.cookies.set("remotellm_console", _console_cookie(broker))
        page = client.get(broker.url + "/admin/connectors").text
    assert "&lt;img src=x id=&#34;injected&#34;&gt;" in page and hostile not in page


def _console_cookie(broker: BrokerHandle) -> str:
    with httpx.Client() as client:
        page = client.get(broker.url + "/admin").text
        token = page.split('name="csrf" value="')[1].split('"')[0]
        assert client.post(broker.url + "/admin/login", data={"csrf": token, "key": ADMIN}).status_code == 303
        return str(client.cookies["remotellm_console"])
