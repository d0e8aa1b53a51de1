"""Enrollment without a browser: one-time codes, the credentials file, the admin API's doors,
console sessions that end, and enrolled connectors that survive a reload."""

import os
import re
import sqlite3
import stat
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from broker.config import ConfigError, parse
from connector.credentials import read_credential, write_credential
from tests.support import BrokerHandle, Stack, wait_until

ADMIN = "sk-admin-enroll"
USER = "sk-user"
CONFIG = f"admin_api_keys: [{ADMIN}]\nconnectors:\n  - name: yaml-box\n    token: ct-yaml\n    models: [m-yaml]\n"
ENROLL = "/tunnel/v1/enroll"
START = 30.0


def make_code(database: str, name: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "broker", "enroll", "--name", name, "--database", database, *extra],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def code_of(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def sqlite_of(tmp_path: Path) -> str:
    return str(tmp_path / "broker-usage.db")  # what Stack gives a broker called "broker"


@pytest.mark.slow  # twenty connectors at once: once per tox run is enough
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_code_is_redeemed_once_when_twenty_race_for_it(
    stack: Stack, tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    database = request.getfixturevalue("postgres").url if backend == "postgresql" else sqlite_of(tmp_path)
    broker = stack.broker(CONFIG, env={"REMOTELLM_DATABASE": database})
    code = code_of(make_code(database, f"racer-{backend}"))
    assert code.startswith("rle_")

    def redeem(_: int) -> httpx.Response:
        return httpx.post(broker.url + ENROLL, json={"code": code}, timeout=30)

    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(redeem, range(20)))
    statuses = [a.status_code for a in answers]
    # One wins; the others lose, or are told to come back (at most 8 redemptions run at once).
    assert statuses.count(200) == 1 and set(statuses) - {200} <= {401, 429} and 401 in statuses
    won = next(a for a in answers if a.status_code == 200).json()
    assert won["name"] == f"racer-{backend}" and won["state"] == "approved" and won["credential"].startswith("rlc_")
    refused = next(a for a in answers if a.status_code == 401).json()
    assert refused["error"]["code"] == "invalid_code"
    assert code not in broker.proc.log() and won["credential"] not in broker.proc.log()


@pytest.mark.slow  # (heavy: once per tox run keeps CI under 25 minutes)
def test_a_code_expires(stack: Stack, tmp_path: Path) -> None:
    broker = stack.broker(CONFIG)
    code = code_of(make_code(sqlite_of(tmp_path), "late", "--ttl", "1"))
    made = time.time()  # (the code was made before this)
    while time.time() < made + 1.1:  # the clock passing the code's end is the event
        time.sleep(0.1)
    answer = httpx.post(broker.url + ENROLL, json={"code": code})
    assert answer.status_code == 401 and answer.json()["error"]["code"] == "invalid_code"
    for bad in (["--ttl", "0"], ["--ttl", "nan"], ["--models", "a b"]):
        result = make_code(sqlite_of(tmp_path), "late", *bad)
        assert result.returncode == 2 and "enroll:" in result.stderr
    assert make_code(sqlite_of(tmp_path), "not a name").returncode == 2


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"not json", 400),
        (b'{"code": 5}', 400),
        (b'{"code": "x", "more": 1}', 400),
        (b'{"code": ""}', 400),
        (b'{"code": "' + b"x" * 3000 + b'"}', 400),
        (b'{"code": "' + b"x" * 5000 + b'"}', 400),
        (b'{"code": "rle_guess"}', 401),
    ],
)
def test_the_enroll_endpoint_answers_bad_input_in_the_api_error_shape(stack: Stack, body: bytes, status: int) -> None:
    broker = stack.broker(CONFIG)
    answer = httpx.post(broker.url + ENROLL, content=body, headers={"content-type": "application/json"})
    assert answer.status_code == status
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "code"} and error["message"]


def test_the_admin_api_and_console_need_an_admin(stack: Stack) -> None:
    broker = stack.broker(CONFIG, user_keys=(USER,))
    for page in ("connectors", "models", "usage", "live"):
        url = f"{broker.url}/admin/api/{page}"
        assert httpx.get(url).status_code == 401
        assert httpx.get(url, headers={"authorization": f"Bearer {USER}"}).status_code == 403
        assert httpx.get(url, headers={"authorization": f"Bearer {ADMIN}"}).status_code == 200
        assert httpx.get(f"{broker.url}/admin/{page}").headers["location"] == "/admin"
        assert httpx.get(f"{broker.url}/admin/{page}/fragment").status_code == 401
    assert httpx.get(f"{broker.url}/admin/api/usage?range=week", headers={"x-api-key": ADMIN}).json()["range"] == "hour"
    made = httpx.post(f"{broker.url}/admin/enroll", data={"name": "sneaky"})
    assert made.status_code == 303 and "rle_" not in made.text
    assert httpx.post(f"{broker.url}/admin/connectors/yaml-box/revoke").status_code == 303
    assert broker.proc.alive


def sign_in(client: httpx.Client, broker: BrokerHandle) -> str:
    """Signs in like a browser (the form's token from its cookie); the console session's cookie."""
    page = client.get(broker.url + "/admin")
    token = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert token is not None
    answer = client.post(broker.url + "/admin/login", data={"csrf": token.group(1), "key": ADMIN})
    assert answer.status_code == 303, answer.text
    return str(client.cookies["remotellm_console"])


def test_a_sign_in_needs_the_forms_token_and_a_session_expires(stack: Stack, tmp_path: Path) -> None:
    broker = stack.broker(CONFIG)
    with httpx.Client() as client:
        assert client.post(broker.url + "/admin/login", data={"key": ADMIN}).status_code == 403  # no form token
        sign_in(client, broker)
        assert client.get(broker.url + "/admin/api/connectors").status_code == 200
        flood = client.post(broker.url + "/admin/enroll", data={f"f{i}": "x" for i in range(25)})
        assert flood.status_code == 400 and "too large" in flood.text
        with sqlite3.connect(sqlite_of(tmp_path)) as db:  # the session's end comes (8 h, here at once)
            db.execute("UPDATE console_sessions SET expires_ms = 0")
        assert client.get(broker.url + "/admin/api/connectors").status_code == 401
        assert client.get(broker.url + "/admin/connectors").headers["location"] == "/admin"
    assert ADMIN not in broker.proc.log()


def test_the_connector_refuses_bad_enrollments_clearly(stack: Stack, tmp_path: Path) -> None:
    broker = stack.broker(CONFIG)
    base = [sys.executable, "-m", "connector", "--broker-url", broker.url, "--llm-url", "http://127.0.0.1:9"]
    run = {"capture_output": True, "text": True, "timeout": 60}
    result = subprocess.run([*base, "--enroll", "rle_x"], **run)  # type: ignore[call-overload]
    assert result.returncode == 2 and "--enroll needs --credentials-file" in result.stderr
    credentials = tmp_path / "creds.json"
    result = subprocess.run([*base, "--enroll", "rle_wrong", "--credentials-file", str(credentials)], **run)  # type: ignore[call-overload]
    assert result.returncode == 1 and "refused the code (401)" in result.stderr
    assert not credentials.exists()
    result = subprocess.run([*base], **run)  # type: ignore[call-overload]
    assert result.returncode == 2 and "--credentials-file" in result.stderr
    credentials.write_text("{not json")
    result = subprocess.run([*base, "--credentials-file", str(credentials)], **run)  # type: ignore[call-overload]
    assert result.returncode == 2 and "not a remotellm credentials file" in result.stderr


def test_the_credentials_file_is_0600_from_its_first_byte(tmp_path: Path) -> None:
    path = tmp_path / "creds.json"
    path.write_text("old")
    path.chmod(0o644)
    old_umask = os.umask(0)
    try:
        write_credential(str(path), "box", "rlc_secret")
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_credential(str(path)) == "rlc_secret"
    assert [p.name for p in tmp_path.iterdir()] == ["creds.json"]  # no temporary file left
    for bad in ('{"credential": "has space"}', '{"credential": 1}', "[]", '{"credential": "' + "x" * 600 + '"}'):
        path.write_text(bad)
        with pytest.raises(ValueError, match="not a remotellm credentials file"):
            read_credential(str(path))


def test_an_enrolled_connector_survives_a_reload_and_needs_only_its_file(stack: Stack, tmp_path: Path) -> None:
    broker = stack.broker(CONFIG)
    llm = stack.llm("m-enrolled")
    code = code_of(make_code(sqlite_of(tmp_path), "enrolled", "--models", "m-enrolled"))
    credentials = tmp_path / "enrolled.json"
    args = [sys.executable, "-m", "connector", "--credentials-file", str(credentials),
            "--broker-url", broker.url, "--llm-url", llm]  # fmt: skip
    first = stack.spawn("connector-enroll", [*args, "--enroll", code])
    broker.wait_models("m-enrolled", timeout=START)
    taken = make_code(sqlite_of(tmp_path), "enrolled")
    assert taken.returncode == 1 and "already" in taken.stderr
    first.stop()
    wait_until(lambda: broker.health()["connectors"] == 0, what="the first run to leave")
    again = stack.spawn("connector-again", args, env={"REMOTELLM_CONNECTOR_TOKEN": ""})
    broker.wait_models("m-enrolled", timeout=START)
    config = tmp_path / "broker-connectors.yaml"
    config.write_text(CONFIG + "user_api_keys: [sk-another]\n")
    wait_until(lambda: "configuration reloaded" in broker.proc.log(), timeout=START, what="the reload")
    assert broker.health()["connectors"] == 1 and broker.proc.log().count("dropped") == 1  # (the first run)
    assert again.alive
    answer = httpx.post(broker.url + "/v1/chat/completions", json={"model": "m-enrolled", "messages": []},
                        headers={"authorization": "Bearer sk-another"}, timeout=10)  # fmt: skip
    assert answer.status_code == 200


def test_a_revocation_on_one_broker_closes_the_tunnel_on_another(stack: Stack, tmp_path: Path) -> None:
    shared = {"REMOTELLM_DATABASE": str(tmp_path / "shared.db")}
    first = stack.broker(CONFIG, env=shared, name="broker-a")
    second = stack.broker(CONFIG, env=shared, name="broker-b")
    code = code_of(make_code(shared["REMOTELLM_DATABASE"], "roamer", "--models", "m-roam"))
    credentials = tmp_path / "roamer.json"
    args = ["--enroll", code, "--credentials-file", str(credentials), "--broker-url", second.url]
    stack.spawn("connector", [sys.executable, "-m", "connector", *args, "--llm-url", stack.llm("m-roam")])
    second.wait_models("m-roam", timeout=START)
    with httpx.Client() as client:
        sign_in(client, first)

        def knows_roamer() -> str:  # broker a reads the enrolled connectors again every second
            page = client.get(first.url + "/admin/connectors").text
            return page if 'data-enrolled="roamer"' in page else ""

        page = wait_until(knows_roamer, what="broker a to know the connector")
        token = re.search(r'name="csrf" value="([^"]+)"', page)
        assert token is not None
        revoked = client.post(first.url + "/admin/connectors/roamer/revoke", data={"csrf": token.group(1)})
    assert revoked.status_code == 303
    wait_until(lambda: second.health()["connectors"] == 0, timeout=2.0, interval=0.05, what="the tunnel on broker b")


def test_require_approval_is_a_boolean_of_connectors_yaml() -> None:
    assert parse("require_approval: true\n").require_approval is True
    assert parse("connectors: []\n").require_approval is False
    with pytest.raises(ConfigError, match=r"<config>:2: require_approval must be true or false"):
        parse("connectors: []\nrequire_approval: sometimes\n")


def test_the_admin_api_enrolls_and_revokes_with_an_admin_key_only(stack: Stack) -> None:
    broker = stack.broker(CONFIG, user_keys=(USER,))
    url, admin = broker.url + "/admin/api", {"authorization": f"Bearer {ADMIN}"}
    asked = {"name": "scripted", "models": ["m-1"], "ttl": 60}
    assert httpx.post(url + "/enroll", json=asked).status_code == 401
    assert httpx.post(url + "/enroll", json=asked, headers={"authorization": f"Bearer {USER}"}).status_code == 403
    for bad in ({"name": "no spaces"}, {"name": "x", "ttl": -1}, {"name": "x", "models": ["a b"]}, {"nom": "x"}):
        refused = httpx.post(url + "/enroll", json=bad, headers=admin)
        assert refused.status_code == 400 and set(refused.json()["error"]) == {"message", "type", "code"}
    assert httpx.post(url + "/enroll", json={"name": "yaml-box"}, headers=admin).status_code == 409
    made = httpx.post(url + "/enroll", json=asked, headers=admin)
    assert made.status_code == 200 and made.json()["ttl"] == 60
    assert made.json()["code"] not in broker.proc.log()
    redeemed = httpx.post(broker.url + ENROLL, json={"code": made.json()["code"]})
    assert redeemed.status_code == 200 and redeemed.json()["name"] == "scripted"
    with httpx.Client() as client:  # a console session's cookie alone does not reach the actions
        sign_in(client, broker)
        assert client.post(url + "/connectors/scripted/revoke").status_code == 401
    revoked = httpx.post(url + "/connectors/scripted/revoke", headers=admin)
    assert revoked.status_code == 200 and revoked.json() == {"name": "scripted", "done": "revoked"}
    assert httpx.post(url + "/connectors/scripted/revoke", headers=admin).status_code == 404
    assert httpx.post(url + "/connectors/scripted/explode", headers=admin).status_code == 404
