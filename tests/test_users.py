"""Users, their models and limits, and the usage they leave: through a real broker and connector."""

import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from broker.usage import TOKEN_SOURCES
from tests.support import BrokerHandle, Stack, wait_until

CONFIG = """
user_api_keys: [sk-unnamed]
admin_api_keys: [sk-admin]
users:
  - name: alice
    key: sk-alice
    models: [m]
    limits: {requests_per_minute: 3}
  - name: carol
    key: sk-carol
    limits: {requests_per_minute: 10, max_parallel: 50}
  - name: bob
    key: sk-bob
  - name: erin
    key: sk-erin
  - name: frank
    key: sk-frank
connectors:
  - name: box
    token: tok-box
    models: [m, other]
"""


def auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


class Team:
    def __init__(self, stack: Stack, config: Path) -> None:
        self.stack = stack
        self.config = config
        self.database = stack.log_dir / "usage.db"
        env = {"REMOTELLM_DATABASE": str(self.database), "REMOTELLM_CONNECTOR_CONFIG": str(config)}
        self.broker: BrokerHandle = stack.broker(None, user_keys=(), env=env, via="module")
        stack.connector(self.broker.url, "tok-box", stack.llm("m", "other"), "m", "other")
        self.broker.wait_models("m", "other")

    def chat(self, key: str, model: str = "m") -> httpx.Response:
        body = {"model": model, "messages": [{"role": "user", "content": "hello there"}]}
        return httpx.post(self.broker.url + "/v1/chat/completions", json=body, headers=auth(key), timeout=20)

    def usage(self, key: str, query: str = "group_by=user,model") -> httpx.Response:
        return httpx.get(self.broker.url + "/v1/usage?" + query, headers=auth(key), timeout=10)


@pytest.fixture(scope="module")
def team(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Team]:
    tmp = tmp_path_factory.mktemp("users")
    stack = Stack(tmp)
    config = tmp / "connectors.yaml"
    config.write_text(CONFIG)
    try:
        yield Team(stack, config)
    finally:
        stack.close()


def test_a_users_models_limit_what_it_may_use_and_see(team: Team) -> None:
    refused = team.chat("sk-alice", "other")
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "model_not_allowed"
    models = httpx.get(team.broker.url + "/v1/models", headers=auth("sk-alice")).json()["data"]
    assert [m["id"] for m in models] == ["m"]
    tags = httpx.get(team.broker.url + "/api/tags", headers=auth("sk-alice")).json()["models"]
    assert [m["name"] for m in tags] == ["m"]
    assert team.chat("sk-bob", "other").status_code == 200
    assert team.chat("sk-unnamed", "other").status_code == 200
    assert team.chat("sk-admin").status_code == 401  # an admin key is not a user key


def test_requests_per_minute_admit_exactly_the_limit_then_429(team: Team) -> None:
    answers = [team.chat("sk-alice") for _ in range(5)]
    assert [a.status_code for a in answers] == [200, 200, 200, 429, 429]
    assert answers[0].headers["x-ratelimit-limit-requests"] == "3"
    assert answers[2].headers["x-ratelimit-remaining-requests"] == "0"
    assert answers[3].json()["error"]["code"] == "rate_limit_exceeded"
    assert int(answers[3].headers["retry-after"]) >= 1


def test_fifty_concurrent_requests_against_ten_a_minute_admit_exactly_ten(team: Team) -> None:
    statuses: list[int] = []
    start = threading.Barrier(50)

    def one() -> None:
        start.wait(10)
        statuses.append(team.chat("sk-carol").status_code)

    threads = [threading.Thread(target=one) for _ in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(statuses) == [200] * 10 + [429] * 40


def test_usage_is_recorded_per_user_and_read_back_by_whom_it_may_be(team: Team) -> None:
    def rows() -> list[dict[str, object]]:
        data: list[dict[str, object]] = team.usage("sk-admin").json()["data"]
        return data

    def carols() -> int:
        return sum(int(str(r["requests"])) for r in rows() if r["user"] == "carol")

    wait_until(lambda: carols() == 50, what="the usage of all 50 to be written")
    by_user = {(r["user"], r["model"]): r for r in rows()}
    assert by_user[("carol", "m")]["requests"] == 10  # the 40 refused count under the unrouted label
    assert by_user[("carol", "m")]["total_tokens"] > 0
    assert by_user[("bob", "other")]["requests"] >= 1
    assert (None, "other") in by_user  # unnamed keys appear as user: null
    own = team.usage("sk-alice").json()["data"]
    assert {r["user"] for r in own} == {"alice"}
    assert team.usage("sk-alice", "user=bob").status_code == 403
    assert team.usage("sk-admin", "user=bob&group_by=user").json()["data"][0]["user"] == "bob"
    assert team.usage("sk-alice", "group_by=nonsense").status_code == 400
    assert team.usage("sk-wrong").status_code == 401
    table = subprocess.run(
        [sys.executable, "-m", "broker", "usage", "--database", str(team.database), "--group-by", "user"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert table.returncode == 0, table.stderr
    assert "carol" in table.stdout and "total_tokens" in table.stdout


def test_reload_adds_and_removes_users_in_place(team: Team) -> None:
    assert team.chat("sk-dave").status_code == 401
    team.config.write_text(CONFIG.replace("  - name: bob\n    key: sk-bob\n", "  - name: dave\n    key: sk-dave\n"))
    wait_until(lambda: team.chat("sk-dave").status_code == 200, what="dave to be added")
    assert team.chat("sk-bob").status_code == 401
    team.config.write_text(CONFIG)
    wait_until(lambda: team.chat("sk-bob").status_code == 200, what="bob to be back")


def test_usage_survives_a_broker_restart(stack: Stack, tmp_path: Path) -> None:
    config = tmp_path / "connectors.yaml"
    config.write_text(CONFIG)
    database = tmp_path / "kept.db"
    env = {"REMOTELLM_DATABASE": str(database), "REMOTELLM_CONNECTOR_CONFIG": str(config)}
    first = stack.broker(None, user_keys=(), env=env, via="module", name="first")
    llm = stack.llm("m")
    stack.connector(first.url, "tok-box", llm, "m", name="connector-first")
    first.wait_models("m")
    assert (
        httpx.post(first.url + "/v1/chat/completions", json={"model": "m"}, headers=auth("sk-bob")).status_code == 200
    )
    assert first.proc.stop() == 0  # SIGTERM: the store writes what it holds before leaving
    second = stack.broker(None, user_keys=(), env=env, via="module", name="second")
    rows = httpx.get(second.url + "/v1/usage?group_by=user", headers=auth("sk-admin")).json()["data"]
    assert [(r["user"], r["requests"]) for r in rows] == [("bob", 1)]


def test_no_connector_cap_unless_configured(stack: Stack) -> None:
    """64 streams at once through one connector whose YAML sets no max_concurrent: all served."""
    broker = stack.broker("connectors:\n  - token: tok-x\n    models: [m]\n", user_keys=("sk-u",))
    stack.connector(broker.url, "tok-x", stack.llm("m"), "m")
    broker.wait_models("m")
    statuses: list[int] = []

    def one() -> None:
        body = {"model": "m", "stream": True, "messages": [], "fake": {"chunks": 20, "delay_ms": 20}}
        with httpx.stream("POST", broker.url + "/v1/chat/completions", json=body, headers=auth("sk-u"),
                          timeout=60) as resp:  # fmt: skip
            resp.read()
            statuses.append(resp.status_code)

    threads = [threading.Thread(target=one) for _ in range(64)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)
    assert statuses == [200] * 64


def test_a_stream_is_metered_and_the_client_gets_what_the_llm_sends_unasked(team: Team) -> None:
    """The connector asks the LLM for usage on the client's behalf and strips it again."""
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "four words of prompt"}],
            "fake": {"chunks": 7}}  # fmt: skip
    url = team.broker.url + "/v1/chat/completions"
    through = httpx.post(url, json=body, headers=auth("sk-frank"), timeout=20)
    assert through.status_code == 200
    assert b'"usage"' not in through.content and through.content.endswith(b"data: [DONE]\n\n")
    asked = {**body, "stream_options": {"include_usage": True}}
    with_usage = httpx.post(url, json=asked, headers=auth("sk-frank"), timeout=20)
    assert with_usage.content.count(b'"usage"') == 1  # asked for: relayed as the LLM sent it

    def franks() -> dict[str, int]:
        rows = team.usage("sk-frank", "group_by=user").json()["data"]
        return {k: int(v) for k, v in rows[0].items() if k != "user"} if rows else {}

    totals = wait_until(lambda: franks().get("requests") == 2 and franks(), what="both usage rows")
    assert totals["completion_tokens"] == 2 * 7
    assert totals["prompt_tokens"] == 2 * 4


def test_a_stream_the_user_cuts_is_counted_from_what_was_delivered_and_marked_estimated(team: Team) -> None:
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "go"}],
            "fake": {"chunks": 400, "delay_ms": 10}}  # fmt: skip
    url = team.broker.url + "/v1/chat/completions"
    with httpx.stream("POST", url, json=body, headers=auth("sk-erin"), timeout=20) as resp:
        events = 0
        for line in resp.iter_lines():
            events += line.startswith("data: ")
            if events == 5:
                break  # the user goes away mid-stream

    def erins() -> list[tuple[int, int]]:
        with sqlite3.connect(team.database) as db:
            return db.execute(
                "SELECT completion_tokens, token_source FROM usage_requests r WHERE r.user = 'erin'"
            ).fetchall()

    rows = wait_until(erins, what="the cut stream's usage row")
    [(completion, source)] = rows
    assert 5 <= completion < 400
    assert TOKEN_SOURCES[source] == "estimated"
