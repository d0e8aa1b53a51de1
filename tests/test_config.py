"""connectors.yaml, broker and connector settings, keys, and the broker's admin commands."""

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from broker import keys
from broker.config import ConfigError, load_file, parse
from broker.settings import BrokerArgs, Settings, resolve
from broker.settings import parse_cli as broker_cli
from connector import settings as connector_settings
from connector.settings import SettingsError

ROOT = Path(__file__).resolve().parent.parent


def sha(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


FULL = f"""\
user_api_keys:
  - sk-user-alice
  - sha256:{sha("sk-user-bob")}
connectors:
  - name: gpu-box-1
    token: ct-secret-1
    llm_api_key: sk-llm-1
    models: [llama3, mistral]
    max_concurrent: 3
  - token: sha256:{sha("ct-secret-2").upper()}
port: 9443
idle_timeout: 12.5
"""


def config_error(text: str, source: str = "conn.yaml") -> str:
    with pytest.raises(ConfigError) as info:
        parse(text, source)
    return str(info.value)


# --- connectors.yaml --------------------------------------------------------------------------------


def test_parse_full_file() -> None:
    config = parse(FULL, "conn.yaml")
    assert config.user_key_digests == (digest("sk-user-alice"), digest("sk-user-bob"))
    first, second = config.connectors
    assert first.name == "gpu-box-1"
    assert first.token_digest == digest("ct-secret-1")
    assert first.llm_api_key == "sk-llm-1"
    assert first.models == frozenset({"llama3", "mistral"})
    assert first.max_concurrent == 3
    assert second.name == "connector-2"
    assert second.token_digest == digest("ct-secret-2")
    assert second.llm_api_key is None
    assert second.models is None
    assert second.max_concurrent is None  # no cap unless configured: the LLM server queues by itself
    assert config.settings == {"port": 9443, "idle_timeout": 12.5}


def test_plain_secrets_are_not_kept() -> None:
    config = parse(FULL)
    assert "ct-secret-1" not in repr(config)
    # The LLM key must be sent on, so it is kept — but not shown.
    assert "sk-llm-1" not in repr(config)
    assert config.connectors[0].llm_api_key == "sk-llm-1"


@pytest.mark.parametrize("text", ["", "# only a comment\n", "connectors:\nuser_api_keys:\n"])
def test_empty_file(text: str) -> None:
    config = parse(text)
    assert config.connectors == ()
    assert config.user_key_digests == ()
    assert config.settings == {}


def test_find_secret_matches_plain_against_sha256_forms() -> None:
    config = parse(FULL)
    assert keys.find_secret("sk-user-alice", config.user_key_digests) == 0
    assert keys.find_secret("sk-user-bob", config.user_key_digests) == 1
    assert keys.find_secret("sk-user-eve", config.user_key_digests) is None
    # presenting the hash itself must not authenticate
    assert keys.find_secret(f"sha256:{sha('sk-user-bob')}", config.user_key_digests) is None
    tokens = [c.token_digest for c in config.connectors]
    assert keys.find_secret("ct-secret-2", tokens) == 1
    assert keys.find_secret("ct-secret-1", tokens) == 0
    assert keys.find_secret("", tokens) is None


def test_find_secret_first_match_wins() -> None:
    assert keys.find_secret("k", [digest("x"), digest("k"), digest("k")]) == 1
    assert keys.find_secret("k", []) is None


def test_parse_secret_forms() -> None:
    assert keys.parse_secret("plain") == digest("plain")
    assert keys.parse_secret(f"sha256:{sha('plain')}") == digest("plain")
    assert keys.parse_secret(f"sha256:{sha('plain').upper()}") == digest("plain")
    assert keys.hash_form("plain") == f"sha256:{sha('plain')}"
    with pytest.raises(ValueError, match="empty"):
        keys.parse_secret("")


@pytest.mark.parametrize("hexpart", ["", "ab" * 31 + "a", "ab" * 33, "zz" * 32, sha("x")[:-1] + "g"])
def test_bad_sha256_rejected(hexpart: str) -> None:
    with pytest.raises(ValueError, match="64 hex digits"):
        keys.parse_secret("sha256:" + hexpart)
    message = config_error(f"connectors:\n  - token: 'sha256:{hexpart}'\n")
    assert message.startswith("conn.yaml:2:")
    assert "connectors[0].token" in message
    assert "64 hex digits" in message
    assert "user_api_keys[0]" in config_error(f"user_api_keys:\n  - 'sha256:{hexpart}'\n")


def test_bearer() -> None:
    assert keys.bearer("Bearer abc") == "abc"
    assert keys.bearer("bearer  abc ") == "abc"
    assert keys.bearer("Basic abc") is None
    assert keys.bearer("Bearer ") is None
    assert keys.bearer(None) is None
    assert keys.bearer("") is None


MISSING_TOKEN = """\
connectors:
  - name: first
    token: t1
    models: [a]
  - name: second
    models: [b]
"""


def test_missing_token_names_file_and_line() -> None:
    message = config_error(MISSING_TOKEN)
    assert message.startswith("conn.yaml:5:")
    assert "connectors[1]" in message
    assert "token is required" in message


def test_load_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "connectors.yaml"
    path.write_text(MISSING_TOKEN)
    with pytest.raises(ConfigError) as info:
        load_file(str(path))
    assert str(info.value).startswith(f"{path}:5:")


def test_load_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="cannot read") as info:
        load_file(str(path))
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        ("connectors:\n  - token: a\n  - token: b\n    colour: red\n", 3, "unknown key(s): colour"),
        ("connectors:\n  - token: a\n\n\n  - token: b\n    models: llama3\n", 5, "models must be a list"),
        ("connectors:\n  - token: a\n    models: [llama3, '']\n", 2, "models must be a list"),
        ("connectors:\n  - token: a\n    max_concurrent: 0\n", 2, "max_concurrent must be a positive integer"),
        ("connectors:\n  - token: a\n    max_concurrent: true\n", 2, "max_concurrent must be a positive integer"),
        ("connectors:\n  - token: a\n    max_concurrent: '4'\n", 2, "max_concurrent must be a positive integer"),
        ("connectors:\n  - token: a\n    name: ''\n", 2, "name must be a non-empty string"),
        ("connectors:\n  - token: a\n    llm_api_key: ''\n", 2, "llm_api_key: a secret may not be empty"),
        ("connectors:\n  - token: 12345\n", 2, "token must be a string"),
        ("connectors:\n  - token: ''\n", 2, "may not be empty"),
        ("port: 1\nhost: x\nidle_timeout: 1: 2\n", 3, "not valid YAML"),
        ("connectors:\n  - name: a\n    token: [unclosed\nport: 1\n", 4, "not valid YAML"),
        ("- a\n- b\n", 1, "top level must be a mapping"),
        ("bogus: 1\n", 1, "unknown key(s): bogus"),
        ("connectors: {token: a}\n", 1, "connectors must be a list"),
        ("user_api_keys: sk-1\n", 1, "user_api_keys must be a list"),
    ],
)
def test_errors_name_the_line(text: str, line: int, fragment: str) -> None:
    message = config_error(text)
    assert message.startswith(f"conn.yaml:{line}:"), message
    assert fragment in message


@pytest.mark.parametrize(
    "text",
    [
        "connectors:\n  - token: same\n  - token: other\n  - token: same\n",
        f"connectors:\n  - token: same\n  - token: sha256:{sha('same')}\n",
    ],
)
def test_shared_tokens_rejected(text: str) -> None:
    assert "share a token" in config_error(text)


def test_unknown_key_lists_them_all() -> None:
    assert "unknown key(s): alpha, beta" in config_error("beta: 1\nalpha: 2\nport: 3\n")


@pytest.mark.parametrize(
    ("text", "line"),
    [
        pytest.param("# header\nuser_api_keys:\n  - ok\n  - sha256:abcd\n", 4, id="bad-user-key"),
        pytest.param("# header\nport: 1\nbogus: 2\n", 3, id="unknown-top-level-key"),
        pytest.param("connectors:\n  - name: a\n    token: t\n  - name: b\n    token: t\n", 4, id="shared-token"),
        pytest.param("connectors:\n  - name: a\n    token: t\n  - oops\n", 4, id="entry-not-a-mapping"),
    ],
)
def test_errors_name_the_offending_line(text: str, line: int) -> None:
    assert config_error(text).startswith(f"conn.yaml:{line}:")


# --- broker settings --------------------------------------------------------------------------------


def write(tmp_path: Path, text: str, name: str = "connectors.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_parse_cli_repeatable_user_key() -> None:
    args = broker_cli(["--user-api-key", "a", "--user-api-key", "b", "--port", "9000"])
    assert args.user_api_key == ["a", "b"]
    assert args.port == 9000
    assert args.host is None
    assert args.connector_config is None


def test_parse_cli_every_flag() -> None:
    args = broker_cli(
        [
            "--host",
            "0.0.0.0",
            "--certfile",
            "c.pem",
            "--keyfile",
            "k.pem",
            "--connector-config",
            "f.yaml",
            "--first-byte-timeout",
            "1.5",
            "--idle-timeout",
            "2",
            "--log-format",
            "json",
        ]
    )
    assert (args.host, args.certfile, args.keyfile, args.connector_config) == ("0.0.0.0", "c.pem", "k.pem", "f.yaml")
    assert args.first_byte_timeout == 1.5
    assert args.idle_timeout == 2.0
    assert args.log_format == "json"
    assert args.user_api_key is None
    assert args.port is None


def test_parse_cli_nothing_and_bad_values() -> None:
    assert broker_cli([]) == BrokerArgs()
    with pytest.raises(SystemExit):
        broker_cli(["--log-format", "xml"])
    with pytest.raises(SystemExit):
        broker_cli(["--port", "eighty"])


def test_resolve_defaults() -> None:
    assert resolve(None, {}) == Settings()
    settings = resolve(None, {})
    assert (settings.host, settings.port, settings.log_format) == ("127.0.0.1", 8443, "plain")
    assert settings.first_byte_timeout == settings.idle_timeout == 300.0


def test_resolve_precedence_cli_env_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "host: 10.0.0.1\nport: 1111\nidle_timeout: 5\nfirst_byte_timeout: 6\nlog_format: json\n"
        "connectors:\n  - token: t\n",
    )
    env = {"REMOTELLM_PORT": "2222", "REMOTELLM_IDLE_TIMEOUT": "7", "REMOTELLM_HOST": ""}
    settings = resolve(broker_cli(["--connector-config", path, "--port", "3333"]), env)
    assert settings.port == 3333  # CLI
    assert settings.idle_timeout == 7.0  # env
    assert settings.first_byte_timeout == 6.0  # file
    assert settings.host == "10.0.0.1"  # file (an empty env value does not count)
    assert settings.log_format == "json"
    assert [c.token_digest for c in settings.connectors] == [digest("t")]
    assert resolve(broker_cli(["--connector-config", path]), env).port == 2222
    assert resolve(broker_cli(["--connector-config", path]), {}).port == 1111


def test_resolve_every_env_var(tmp_path: Path) -> None:
    path = write(tmp_path, "connectors:\n  - token: t\n")
    env = {
        "REMOTELLM_HOST": "::1",
        "REMOTELLM_PORT": "8080",
        "REMOTELLM_CERTFILE": "c.pem",
        "REMOTELLM_KEYFILE": "k.pem",
        "REMOTELLM_FIRST_BYTE_TIMEOUT": "1.5",
        "REMOTELLM_IDLE_TIMEOUT": "2.5",
        "REMOTELLM_LOG_FORMAT": "json",
        "REMOTELLM_CONNECTOR_CONFIG": path,
        "REMOTELLM_USER_API_KEYS": "k1",
    }
    settings = resolve(None, env)
    assert (settings.host, settings.port, settings.certfile, settings.keyfile) == ("::1", 8080, "c.pem", "k.pem")
    assert (settings.first_byte_timeout, settings.idle_timeout, settings.log_format) == (1.5, 2.5, "json")
    assert len(settings.connectors) == 1
    assert settings.user_key_digests == (digest("k1"),)


def test_cli_config_path_wins_over_env(tmp_path: Path) -> None:
    path = write(tmp_path, "connectors:\n  - token: t\n")
    env = {"REMOTELLM_CONNECTOR_CONFIG": str(tmp_path / "missing.yaml")}
    assert len(resolve(broker_cli(["--connector-config", path]), env).connectors) == 1
    with pytest.raises(ConfigError, match=r"missing\.yaml"):
        resolve(None, env)


def test_user_keys_merged_from_all_sources(tmp_path: Path) -> None:
    path = write(tmp_path, f"user_api_keys:\n  - from-file\n  - sha256:{sha('from-cli')}\n")
    args = broker_cli(["--user-api-key", "from-cli", "--user-api-key", "cli-2", "--connector-config", path])
    settings = resolve(args, {"REMOTELLM_USER_API_KEYS": " env-1 , ,env-2,"})
    assert set(settings.user_key_digests) == {digest(k) for k in ("from-cli", "cli-2", "env-1", "env-2", "from-file")}
    assert len(settings.user_key_digests) == 5  # the duplicate (plain and sha256 of from-cli) once
    for key in ("from-cli", "cli-2", "env-1", "env-2", "from-file"):
        assert keys.find_secret(key, settings.user_key_digests) is not None
    assert keys.find_secret("", settings.user_key_digests) is None


def test_bad_user_key_on_cli() -> None:
    with pytest.raises(ConfigError, match="user API key"):
        resolve(broker_cli(["--user-api-key", "sha256:12"]), {})


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"REMOTELLM_PORT": "0"}, "port"),
        ({"REMOTELLM_PORT": "65536"}, "port"),
        ({"REMOTELLM_PORT": "-1"}, "port"),
        ({"REMOTELLM_PORT": "http"}, "port"),
        ({"REMOTELLM_PORT": "80.5"}, "port"),
        ({"REMOTELLM_FIRST_BYTE_TIMEOUT": "0"}, "first_byte_timeout"),
        ({"REMOTELLM_FIRST_BYTE_TIMEOUT": "-3"}, "first_byte_timeout"),
        ({"REMOTELLM_IDLE_TIMEOUT": "soon"}, "idle_timeout"),
        ({"REMOTELLM_LOG_FORMAT": "xml"}, "log_format"),
        ({"REMOTELLM_CERTFILE": "c.pem"}, "certfile and keyfile"),
        ({"REMOTELLM_KEYFILE": "k.pem"}, "certfile and keyfile"),
    ],
)
def test_resolve_validates(env: dict[str, str], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        resolve(None, env)


def test_port_bounds_accepted() -> None:
    assert resolve(None, {"REMOTELLM_PORT": "1"}).port == 1
    assert resolve(None, {"REMOTELLM_PORT": "65535"}).port == 65535


def test_certfile_without_keyfile_on_cli_and_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="certfile and keyfile"):
        resolve(broker_cli(["--certfile", "c.pem"]), {})
    path = write(tmp_path, "keyfile: k.pem\n")
    with pytest.raises(ConfigError, match="certfile and keyfile"):
        resolve(broker_cli(["--connector-config", path]), {})
    settings = resolve(broker_cli(["--connector-config", path, "--certfile", "c.pem"]), {})
    assert (settings.certfile, settings.keyfile) == ("c.pem", "k.pem")


def test_yaml_setting_validated(tmp_path: Path) -> None:
    path = write(tmp_path, "port: 70000\n")
    with pytest.raises(ConfigError, match="port"):
        resolve(broker_cli(["--connector-config", path]), {})
    # An invalid file stays invalid even where a flag would override the value.
    with pytest.raises(ConfigError, match=":1: port"):
        resolve(broker_cli(["--connector-config", path, "--port", "80"]), {})


@pytest.mark.parametrize("var", ["REMOTELLM_FIRST_BYTE_TIMEOUT", "REMOTELLM_IDLE_TIMEOUT"])
def test_nan_timeout_rejected(var: str) -> None:
    with pytest.raises(ConfigError):
        resolve(None, {var: "nan"})


@pytest.mark.parametrize("text", ["port: true\n", "port: 8080.9\n", "host: 123\n"], ids=["bool", "float", "host"])
def test_yaml_setting_types_rejected(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError):
        resolve(broker_cli(["--connector-config", write(tmp_path, text)]), {})


# --- python -m broker hash-key / check-config -------------------------------------------------------


def run_broker(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "broker", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)


def test_hash_key_command() -> None:
    result = run_broker("hash-key", "sk-user-alice")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"sha256:{sha('sk-user-alice')}"
    assert keys.parse_secret(result.stdout.strip()) == digest("sk-user-alice")


def test_check_config_valid(tmp_path: Path) -> None:
    result = run_broker("check-config", write(tmp_path, FULL))
    assert result.returncode == 0, result.stderr
    assert "2 connector(s)" in result.stdout
    assert "2 user key(s)" in result.stdout


def test_check_config_invalid(tmp_path: Path) -> None:
    path = write(tmp_path, MISSING_TOKEN)
    result = run_broker("check-config", path)
    assert result.returncode == 1
    assert f"{path}:5:" in result.stderr
    assert "token is required" in result.stderr
    assert result.stdout == ""


# --- connector settings -----------------------------------------------------------------------------

CONNECTOR_ENV = {
    "REMOTELLM_BROKER_URL": "https://broker.example:8443/",
    "REMOTELLM_CONNECTOR_TOKEN": "ct-env",
    "REMOTELLM_LLM_URL": "http://127.0.0.1:11434/",
}


def test_connector_cli_repeatable_model() -> None:
    args = connector_settings.parse_cli(
        [
            "--broker-url",
            "https://b",
            "--token",
            "ct",
            "--llm-url",
            "http://l",
            "--model",
            "a",
            "--model",
            "b",
            "--health-port",
            "8081",
            "--proxy",
            "http://proxy:3128",
            "--ca-certs",
            "ca.pem",
        ]
    )
    assert args.model == ["a", "b"]
    assert (args.broker_url, args.token, args.llm_url) == (["https://b"], "ct", "http://l")
    assert args.health_port == 8081
    assert (args.proxy, args.ca_certs) == ("http://proxy:3128", "ca.pem")
    assert connector_settings.parse_cli([]).model is None


def test_connector_resolve_from_cli() -> None:
    args = connector_settings.parse_cli(
        ["--broker-url", "https://b/", "--token", "ct", "--llm-url", "http://l", "--model", "a", "--model", "a"]
    )
    settings = connector_settings.resolve(args, {})
    assert settings.broker_url == "https://b"
    assert settings.token == "ct"
    assert settings.llm_url == "http://l"
    assert settings.models == ("a",)
    assert settings.health_port == 0
    assert settings.proxy is None
    assert settings.ca_certs is None


def test_connector_env_fallbacks(tmp_path: Path) -> None:
    env = {**CONNECTOR_ENV, "REMOTELLM_MODELS": " llama3, mistral,,llama3 ", "REMOTELLM_HEALTH_PORT": "9100"}
    env["REMOTELLM_CA_CERTS"] = ca = str(tmp_path / "ca.pem")
    Path(ca).write_text("")
    settings = connector_settings.resolve(None, env)
    assert settings.broker_url == "https://broker.example:8443"
    assert settings.token == "ct-env"
    assert settings.llm_url == "http://127.0.0.1:11434"
    assert settings.models == ("llama3", "mistral")
    assert settings.health_port == 9100
    assert settings.ca_certs == ca


def test_connector_cli_wins_over_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("c").write_text("")
    env = {**CONNECTOR_ENV, "REMOTELLM_MODELS": "x,y", "REMOTELLM_HEALTH_PORT": "9100", "REMOTELLM_CA_CERTS": "e"}
    args = connector_settings.parse_cli(
        ["--token", "ct-cli", "--model", "z", "--health-port", "0", "--ca-certs", "c", "--llm-url", "http://o"]
    )
    settings = connector_settings.resolve(args, env)
    assert settings.token == "ct-cli"
    assert settings.models == ("z",)
    assert settings.health_port == 0
    assert settings.ca_certs == "c"
    assert settings.llm_url == "http://o"
    assert settings.broker_url == "https://broker.example:8443"


def test_connector_refuses_a_missing_ca_file_and_a_bad_proxy() -> None:
    with pytest.raises(connector_settings.SettingsError, match="--ca-certs: no such file"):
        connector_settings.resolve(None, {**CONNECTOR_ENV, "REMOTELLM_CA_CERTS": "/nonexistent/ca.pem"})
    args = connector_settings.parse_cli(["--proxy", "ftp://user:secret@proxy"])
    with pytest.raises(connector_settings.SettingsError, match="not a proxy URL") as caught:
        connector_settings.resolve(args, CONNECTOR_ENV)
    assert "secret" not in str(caught.value)


def test_connector_no_models_means_discover() -> None:
    assert connector_settings.resolve(None, CONNECTOR_ENV).models == ()


@pytest.mark.parametrize(
    ("missing", "flag"),
    [
        ("REMOTELLM_BROKER_URL", "--broker-url"),
        ("REMOTELLM_CONNECTOR_TOKEN", "--token"),
        ("REMOTELLM_LLM_URL", "--llm-url"),
    ],
)
def test_connector_missing_required(missing: str, flag: str) -> None:
    env = {k: v for k, v in CONNECTOR_ENV.items() if k != missing}
    with pytest.raises(SettingsError) as info:
        connector_settings.resolve(None, env)
    assert flag in str(info.value)
    assert missing in str(info.value)
    with pytest.raises(SettingsError, match=flag):
        connector_settings.resolve(None, {**env, missing: ""})


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"REMOTELLM_BROKER_URL": "broker.example:8443"}, "--broker-url"),
        ({"REMOTELLM_LLM_URL": "ftp://llm"}, "--llm-url"),
        ({"REMOTELLM_HEALTH_PORT": "abc"}, "REMOTELLM_HEALTH_PORT"),
        ({"REMOTELLM_HEALTH_PORT": "70000"}, "--health-port"),
        ({"REMOTELLM_HEALTH_PORT": "-1"}, "--health-port"),
    ],
)
def test_connector_validates(env: dict[str, str], fragment: str) -> None:
    with pytest.raises(SettingsError, match=fragment):
        connector_settings.resolve(None, {**CONNECTOR_ENV, **env})


def test_connector_settings_repr_hides_token() -> None:
    settings = connector_settings.resolve(None, {**CONNECTOR_ENV, "REMOTELLM_CONNECTOR_TOKEN": "ct-very-secret"})
    assert settings.token == "ct-very-secret"
    assert "ct-very-secret" not in repr(settings)
    assert "ct-very-secret" not in str(settings)
    assert "ct-very-secret" not in f"{settings!r} {[settings]}"
    assert "https://broker.example:8443" in repr(settings)


# --- the trust boundary at load time ------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("user_api_keys:\n  - ' sk-edge'\n", 2),
        ('user_api_keys:\n  - sk-ok\n  - "sk-tab\\t"\n', 3),
        ("connectors:\n  - token: 'ct with space'\n", 2),
        ('connectors:\n  - token: ct-1\n    llm_api_key: "sk-llm\\n"\n', 2),
        ("connectors:\n  - token: ct-1\n    llm_api_key: sk-llm-é\n", 2),
    ],
)
def test_secrets_must_be_visible_ascii_without_whitespace(text: str, line: int) -> None:
    message = config_error(text)
    assert message.startswith(f"conn.yaml:{line}:"), message
    assert "visible ASCII" in message
    assert "sk-edge" not in message and "sk-llm" not in message and "ct with" not in message


def test_a_user_key_may_not_be_a_connector_token(tmp_path: Path) -> None:
    assert "also a user or admin key" in config_error("user_api_keys: [shared-1]\nconnectors:\n  - token: shared-1\n")
    path = tmp_path / "c.yaml"
    path.write_text("connectors:\n  - token: shared-2\n")
    with pytest.raises(ConfigError, match="also a connector token"):
        resolve(BrokerArgs(connector_config=str(path), user_api_key=["shared-2"]), {})


@pytest.mark.parametrize(
    "path", ["v1/x", "/v1/../api/create", "/v1//x", "/v1/%2e%2e/x", "/v1/a%2Fb", "/api/pull", "/api/blobs/x"]
)
def test_allowed_paths_must_be_canonical_and_not_management(path: str) -> None:
    assert "allowed_paths" in config_error(f"allowed_paths: ['{path}']\n")
    assert "allowed_paths" in config_error(f"connectors:\n  - token: t\n    allowed_paths: ['{path}']\n")


def test_allowed_paths_top_level_and_per_connector() -> None:
    config = parse("allowed_paths: [/v1/a]\nconnectors:\n  - token: t\n    models: [m]\n    allowed_paths: [/v1/b]\n")
    assert config.allowed_paths == {"/v1/a"}
    assert config.connectors[0].allowed_paths == {"/v1/b"}
    assert config.warnings == ()


def test_a_token_without_models_is_warned_about_with_its_line(tmp_path: Path) -> None:
    config = parse("connectors:\n  - token: t1\n    models: [m]\n  - name: open\n    token: t2\n", "c.yaml")
    assert len(config.warnings) == 1
    assert config.warnings[0].startswith("c.yaml:4: connector 'open' has no models")
    path = tmp_path / "c.yaml"
    path.write_text("connectors:\n  - name: open\n    token: t2\n")
    done = subprocess.run([sys.executable, "-m", "broker", "check-config", str(path)], capture_output=True, text=True)
    assert done.returncode == 0
    assert "warning:" in done.stderr and "'open' has no models" in done.stderr


def test_body_limits_checked_against_the_frame_and_memory_limits() -> None:
    with pytest.raises(ConfigError, match="frame"):
        resolve(None, {"REMOTELLM_MAX_BODY_SIZE": str(64 * 1024 * 1024)})
    with pytest.raises(ConfigError, match="body_memory_limit"):
        resolve(None, {"REMOTELLM_MAX_BODY_SIZE": "2000", "REMOTELLM_BODY_MEMORY_LIMIT": "1000"})
    settings = resolve(None, {"REMOTELLM_BODY_TIMEOUT": "5", "REMOTELLM_BODY_MEMORY_LIMIT": "99999999"})
    assert settings.body_timeout == 5.0 and settings.body_memory_limit == 99999999
    assert Settings().body_timeout == 60.0
