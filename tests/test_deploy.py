"""deploy/: systemd units, launchd plists, the example config and the install scripts.

The install scripts run for real, but in throwaway prefixes with the pip step skipped (fast,
offline): they must lay out the expected files with safe modes, change nothing on a second
run, and uninstall what they installed while keeping the secrets unless --purge.
"""

import hashlib
import os
import plistlib
import re
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
EXAMPLE = DEPLOY / "connectors.yaml.example"
UNITS = {role: DEPLOY / "systemd" / f"remotellm-{role}.service" for role in ("broker", "connector")}
PLISTS = {role: DEPLOY / "launchd" / f"com.remotellm.{role}.plist" for role in ("broker", "connector")}
LINUX = DEPLOY / "install-linux.sh"
MACOS = DEPLOY / "install-macos.sh"
COMMON = DEPLOY / "install-common.sh"  # sourced by both
ROLES = ("broker", "connector")
# The broker settings the contract lets connectors.yaml carry by their long names.
CONTRACT_SETTINGS = {
    "host", "port", "certfile", "keyfile", "first_byte_timeout", "idle_timeout", "log_format", "body_timeout",
    "body_memory_limit",
}  # fmt: skip

VENV_PYTHON = "/opt/remotellm/venv/bin/python"  # what the units run, relative to the root
MAC_APP = "Library/Application Support/remotellm"  # what install-macos.sh lays out under HOME
TIMEOUT = 120  # seconds, for every subprocess
# The lines the install scripts print when they change something.
CHANGE_REPORTED = re.compile(r"^install-\w+\.sh: (created|installed /|mode \d|removed|restarted|started|loaded)", re.M)

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze not found (Debian/Ubuntu: apt-get install systemd)"
)


# --- helpers -------------------------------------------------------------------------------


def run(
    cmd: list[str | Path], env: dict[str, str] | None = None, timeout: float = TIMEOUT
) -> "subprocess.CompletedProcess[str]":
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, env=env, check=False)


def install_env(home: Path, **extra: str) -> dict[str, str]:
    """A clean environment for the scripts: no REMOTELLM_* leaks in from the test runner."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "PYTHON": sys.executable,
        "LC_ALL": "C",
    }
    env.update(extra)
    return env


def install(script: Path, prefix: Path, *args: str, **env: str) -> "subprocess.CompletedProcess[str]":
    result = run(["bash", script, "--prefix", prefix, "--no-pip", *args], env=install_env(prefix.parent, **env))
    assert result.returncode == 0, f"{script.name} {args} failed:\n{result.stdout}\n{result.stderr}"
    return result


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    """Every path under root with its type, mode, content digest, mtime and ctime."""
    entries: dict[str, tuple[object, ...]] = {}
    for path in sorted([root, *root.rglob("*")]):
        info = path.lstat()
        if stat.S_ISLNK(info.st_mode):
            content: object = os.readlink(path)
        elif stat.S_ISREG(info.st_mode):
            content = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            content = None
        entries[str(path.relative_to(root))] = (
            stat.S_IFMT(info.st_mode),
            stat.S_IMODE(info.st_mode),
            content,
            info.st_mtime_ns,
            info.st_ctime_ns,  # a needless chmod or rewrite shows here even when content is equal
        )
    return entries


def unit_entries(text: str) -> dict[str, list[tuple[str, str]]]:
    """[section] -> [(key, value)], keeping repeated keys (systemd allows them)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = line.strip("[]")
            sections.setdefault(current, [])
            continue
        key, _, value = line.partition("=")
        sections[current].append((key.strip(), value.strip()))
    return sections


def unit_value(sections: dict[str, list[tuple[str, str]]], section: str, key: str) -> str | None:
    values = [v for k, v in sections.get(section, []) if k == key]
    return values[-1] if values else None


def with_exec(unit_text: str, python: str) -> str:
    """The unit with its ExecStart interpreter replaced: systemd-analyze verify wants it to exist."""
    assert VENV_PYTHON in unit_text
    return unit_text.replace(VENV_PYTHON, python)


def verify(unit: Path) -> list[str]:
    """Problems systemd-analyze verify reports for this unit file (empty: clean).

    verify exits 0 on an unknown key or a bad value (it only warns), so every line that
    names the unit counts too; lines about the host's own units do not.
    """
    assert SYSTEMD_ANALYZE is not None
    result = run([SYSTEMD_ANALYZE, "verify", "--man=no", unit], env={**os.environ, "SYSTEMD_LOG_COLOR": "0"})
    problems = [line for line in (result.stdout + result.stderr).splitlines() if unit.name in line]
    if result.returncode != 0:
        problems.append(f"exit status {result.returncode}: {result.stderr.strip()}")
    return problems


def verify_copy(tmp_path: Path, name: str, text: str) -> list[str]:
    directory = tmp_path / f"verify-{len(list(tmp_path.glob('verify-*')))}"
    directory.mkdir()
    (directory / name).write_text(text)
    return verify(directory / name)


def real_python() -> str:
    return os.path.realpath(sys.executable)


# --- the example config ----------------------------------------------------------------------


def check_config(path: Path) -> "subprocess.CompletedProcess[str]":
    """``python -m broker check-config`` of this checkout, as the contract documents it."""
    return run([sys.executable, "-m", "broker", "check-config", path], env={**os.environ, "PYTHONPATH": str(REPO)})


def test_example_config_passes_check_config() -> None:
    result = check_config(EXAMPLE)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok: 2 connector(s), 2 user key(s)"), result.stdout


def test_example_config_shows_every_key() -> None:
    text = EXAMPLE.read_text()
    for key in ("user_api_keys:", "connectors:", "name:", "token:", "llm_api_key:", "models:", "max_concurrent:"):
        assert re.search(rf"^\s*(- )?{key}", text, re.M), key
    assert re.search(r"^\s*- sha256:[0-9a-f]{64}\s*$", text, re.M), "a user key in sha256: form"
    assert re.search(r"^\s*token: sha256:[0-9a-f]{64}", text, re.M), "a token in sha256: form"
    assert "default 8" in text
    # The broker settings are there by long name, commented out.
    assert set(re.findall(r"^#(\w+):", text, re.M)) == CONTRACT_SETTINGS | {"allowed_paths", "require_approval"}


def test_example_config_settings_parse_when_uncommented(tmp_path: Path) -> None:
    names = "|".join(sorted(CONTRACT_SETTINGS))
    text, count = re.subn(rf"^#({names}):", r"\1:", EXAMPLE.read_text(), flags=re.M)
    assert count == len(CONTRACT_SETTINGS)
    (tmp_path / "c.yaml").write_text(text)
    result = check_config(tmp_path / "c.yaml")  # unknown keys or bad values would fail here
    assert result.returncode == 0, result.stderr


# --- systemd units ---------------------------------------------------------------------------


@pytest.mark.parametrize("role", ROLES)
def test_unit_runs_the_cli_without_secrets_on_the_command_line(role: str) -> None:
    sections = unit_entries(UNITS[role].read_text())
    exec_start = unit_value(sections, "Service", "ExecStart")
    assert exec_start is not None
    assert exec_start.startswith(f"{VENV_PYTHON} -m {role}")
    assert not re.search(r"--token|--user-api-key|sk-|ct-", exec_start), exec_start
    env_files = [v for k, v in sections["Service"] if k == "EnvironmentFile"]
    assert env_files == [f"-/etc/remotellm/{role}.env" if role == "broker" else "/etc/remotellm/connector.env"]
    if role == "broker":
        assert "--connector-config %d/connectors.yaml" in exec_start
        assert unit_value(sections, "Service", "LoadCredential") == "connectors.yaml:/etc/remotellm/connectors.yaml"


@pytest.mark.parametrize("role", ROLES)
def test_unit_restarts_with_backoff_and_stops_on_sigterm(role: str) -> None:
    sections = unit_entries(UNITS[role].read_text())
    assert unit_value(sections, "Service", "Restart") == "always"
    assert unit_value(sections, "Service", "RestartSec")
    assert unit_value(sections, "Unit", "StartLimitIntervalSec")
    assert unit_value(sections, "Unit", "StartLimitBurst")
    assert unit_value(sections, "Service", "RestartPreventExitStatus") == "2"  # a config error
    assert unit_value(sections, "Service", "KillSignal") == "SIGTERM"
    assert unit_value(sections, "Service", "TimeoutStopSec") == "30s"
    assert unit_value(sections, "Install", "WantedBy") == "multi-user.target"


@pytest.mark.parametrize("role", ROLES)
def test_unit_is_hardened(role: str) -> None:
    text = UNITS[role].read_text()
    sections = unit_entries(text)
    expected = {
        "DynamicUser": "yes",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "CapabilityBoundingSet": "",
        "AmbientCapabilities": "",
        "LockPersonality": "yes",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "UMask": "0077",
    }
    for key, value in expected.items():
        assert unit_value(sections, "Service", key) == value, key
    # The capability for a port below 1024 is offered only as a comment.
    assert re.search(r"^#\s*AmbientCapabilities=CAP_NET_BIND_SERVICE", text, re.M)


@needs_systemd_analyze
@pytest.mark.parametrize("role", ROLES)
def test_unit_passes_systemd_analyze_verify(role: str, tmp_path: Path) -> None:
    text = with_exec(UNITS[role].read_text(), real_python())
    assert verify_copy(tmp_path, UNITS[role].name, text) == []


@needs_systemd_analyze
def test_verify_check_catches_broken_units(tmp_path: Path) -> None:
    """The check above must bite: systemd-analyze verify only warns on most mistakes."""
    good = with_exec(UNITS["broker"].read_text(), real_python())
    assert verify_copy(tmp_path, "remotellm-broker.service", good) == []
    typo = good.replace("NoNewPrivileges=yes", "NoNewPrivilege=yes")
    assert any("NoNewPrivilege" in p for p in verify_copy(tmp_path, "remotellm-broker.service", typo))
    bad_value = good.replace("Restart=always", "Restart=sometimes")
    assert verify_copy(tmp_path, "remotellm-broker.service", bad_value)
    missing = with_exec(UNITS["broker"].read_text(), str(tmp_path / "no" / "python"))
    assert verify_copy(tmp_path, "remotellm-broker.service", missing)


@needs_systemd_analyze
@pytest.mark.parametrize("role", ROLES)
def test_unit_security_exposure_is_low(role: str, tmp_path: Path) -> None:
    assert SYSTEMD_ANALYZE is not None
    if "--offline" not in run([SYSTEMD_ANALYZE, "--help"]).stdout:
        pytest.skip("systemd-analyze security --offline needs systemd >= 250")
    unit = tmp_path / UNITS[role].name
    unit.write_text(with_exec(UNITS[role].read_text(), real_python()))
    # --threshold is 10x the score: fail above 2.5 (now ~1.5; losing DynamicUser=, ProtectSystem=,
    # ProtectHome= and SystemCallFilter= gives 3.5; "OK" is anything below 4.9).
    result = run([SYSTEMD_ANALYZE, "security", "--offline=yes", "--threshold=25", "--no-pager", unit])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr


# --- launchd plists --------------------------------------------------------------------------


@pytest.mark.parametrize("role", ROLES)
def test_plist_template(role: str) -> None:
    raw = PLISTS[role].read_text()
    plist = plistlib.loads(PLISTS[role].read_bytes())
    assert plist["Label"] == f"com.remotellm.{role}"
    assert plist["RunAtLoad"] is True
    assert plist["KeepAlive"] is True
    assert plist["ThrottleInterval"] >= 1
    assert plist["StandardOutPath"] == f"@HOME@/Library/Logs/remotellm/{role}.log"
    assert plist["StandardErrorPath"] == f"@HOME@/Library/Logs/remotellm/{role}.log"
    args = plist["ProgramArguments"]
    assert args[:3] == [f"@HOME@/{MAC_APP}/venv/bin/python", "-m", role]
    if role == "broker":
        assert args[3:] == ["--connector-config", f"@HOME@/{MAC_APP}/connectors.yaml"]
    else:
        assert args[3:] == []  # every setting, the token included, comes from EnvironmentVariables
    assert not any(re.search(r"token|api-key|sk-|ct-", a) for a in args)
    assert "0600" in raw  # the comment: a plist holding a token must be 0600
    for comment in re.findall(r"<!--(.*?)-->", raw, re.S):
        assert "--" not in comment  # not well-formed XML otherwise (plistlib's parser is lenient)


# --- install-linux.sh ------------------------------------------------------------------------


def linux_paths(prefix: Path) -> dict[str, Path]:
    etc = prefix / "etc/remotellm"
    return {
        "etc": etc,
        "yaml": etc / "connectors.yaml",
        "broker_env": etc / "broker.env",
        "example": etc / "connectors.yaml.example",
        "connector_env": etc / "connector.env",
        "venv": prefix / "opt/remotellm/venv",
        "python": prefix / VENV_PYTHON.lstrip("/"),
        "broker_unit": prefix / "etc/systemd/system/remotellm-broker.service",
        "connector_unit": prefix / "etc/systemd/system/remotellm-connector.service",
    }


def test_linux_install_broker_layout(tmp_path: Path) -> None:
    prefix = tmp_path / "root"
    install(LINUX, prefix, "--role", "broker")
    p = linux_paths(prefix)
    assert mode(p["etc"]) == 0o700
    assert mode(p["yaml"]) == 0o600
    assert mode(p["broker_env"]) == 0o600
    assert p["example"].read_text() == EXAMPLE.read_text()
    assert mode(p["broker_unit"]) == 0o644
    assert p["broker_unit"].read_text() == UNITS["broker"].read_text()
    assert not p["connector_unit"].exists()
    # The unit's interpreter is the venv the script made; the fresh config is valid and empty.
    assert os.access(p["python"], os.X_OK)
    result = run([p["python"], "-c", "import sys; print(sys.prefix)"])
    assert os.path.realpath(result.stdout.strip()) == os.path.realpath(p["venv"])
    check = check_config(p["yaml"])
    assert check.returncode == 0 and check.stdout.startswith("ok: 0 connector(s), 0 user key(s)"), check


@needs_systemd_analyze
@pytest.mark.parametrize("role", ROLES)
def test_linux_installed_unit_verifies_against_the_installed_venv(role: str, tmp_path: Path) -> None:
    prefix = tmp_path / "root"
    install(LINUX, prefix, "--role", role)
    unit = prefix / f"etc/systemd/system/remotellm-{role}.service"
    # Under the prefix, the unit's /opt/... path is the prefix's: point it there and verify.
    text = with_exec(unit.read_text(), str(prefix / VENV_PYTHON.lstrip("/")))
    assert verify_copy(tmp_path, unit.name, text) == []


def test_linux_install_connector_writes_the_env_file(tmp_path: Path) -> None:
    prefix = tmp_path / "root"
    install(
        LINUX,
        prefix,
        "--role",
        "connector",
        "--broker-url",
        "https://broker.example.com:8443",
        "--model",
        "llama3",
        "--model",
        "qwen2.5",
        REMOTELLM_CONNECTOR_TOKEN="ct-from-env",
    )
    p = linux_paths(prefix)
    env_file = p["connector_env"]
    assert mode(env_file) == 0o600
    lines = env_file.read_text().splitlines()
    assert "REMOTELLM_BROKER_URL=https://broker.example.com:8443" in lines
    assert "REMOTELLM_LLM_URL=http://127.0.0.1:11434" in lines
    assert "REMOTELLM_CONNECTOR_TOKEN=ct-from-env" in lines
    assert "REMOTELLM_MODELS=llama3,qwen2.5" in lines
    assert mode(p["connector_unit"]) == 0o644
    assert not p["yaml"].exists() and not p["broker_unit"].exists()


def test_linux_install_twice_changes_nothing(tmp_path: Path) -> None:
    prefix = tmp_path / "root"
    first = install(LINUX, prefix, "--role", "broker")
    assert CHANGE_REPORTED.search(first.stdout), first.stdout  # the pattern below does see changes
    install(LINUX, prefix, "--role", "connector", REMOTELLM_CONNECTOR_TOKEN="ct-1")
    before = snapshot(prefix)
    second = install(LINUX, prefix, "--role", "broker")
    install(LINUX, prefix, "--role", "connector", REMOTELLM_CONNECTOR_TOKEN="ct-other")
    assert snapshot(prefix) == before
    assert not CHANGE_REPORTED.search(second.stdout), second.stdout


def test_linux_install_keeps_edited_config_and_fixes_loose_modes(tmp_path: Path) -> None:
    prefix = tmp_path / "root"
    install(LINUX, prefix, "--role", "broker")
    p = linux_paths(prefix)
    p["yaml"].write_text("user_api_keys: [sk-mine]\n")
    p["yaml"].chmod(0o644)
    p["etc"].chmod(0o755)
    p["broker_unit"].write_text("stale\n")
    install(LINUX, prefix, "--role", "broker")
    assert p["yaml"].read_text() == "user_api_keys: [sk-mine]\n"  # never overwritten
    assert mode(p["yaml"]) == 0o600
    assert mode(p["etc"]) == 0o700
    assert p["broker_unit"].read_text() == UNITS["broker"].read_text()  # the unit is ours: replaced


def test_linux_uninstall_keeps_secrets_unless_purge(tmp_path: Path) -> None:
    prefix = tmp_path / "root"
    install(LINUX, prefix, "--role", "broker")
    install(LINUX, prefix, "--role", "connector", REMOTELLM_CONNECTOR_TOKEN="ct-1")
    p = linux_paths(prefix)

    install(LINUX, prefix, "--role", "broker", "--uninstall")
    assert not p["broker_unit"].exists() and not p["example"].exists()
    assert p["yaml"].exists() and p["broker_env"].exists()  # secrets stay
    assert p["python"].exists()  # the connector still uses the venv

    install(LINUX, prefix, "--role", "connector", "--uninstall")
    assert not p["connector_unit"].exists()
    assert not (prefix / "opt/remotellm").exists()
    assert p["connector_env"].read_text().count("ct-1") == 1

    again = snapshot(prefix)
    install(LINUX, prefix, "--role", "connector", "--uninstall")  # a second uninstall is a no-op
    assert snapshot(prefix) == again

    install(LINUX, prefix, "--role", "broker", "--uninstall", "--purge")
    install(LINUX, prefix, "--role", "connector", "--uninstall", "--purge")
    assert not p["etc"].exists()
    leftovers = [path for path in prefix.rglob("*") if not path.is_dir()]
    assert leftovers == []


def test_linux_skip_pip_by_environment(tmp_path: Path) -> None:
    prefix = tmp_path / "root"
    env = install_env(tmp_path, REMOTELLM_INSTALL_SKIP_PIP="1")
    result = run(["bash", LINUX, "--prefix", prefix, "--role", "broker"], env=env)
    assert result.returncode == 0, result.stderr
    assert "skipped pip install" in result.stdout
    assert not (linux_paths(prefix)["venv"] / ".remotellm-source").exists()


# --- install-macos.sh (prefix mode works on any OS: no launchctl) ----------------------------


def mac_paths(home: Path) -> dict[str, Path]:
    app = home / MAC_APP
    return {
        "app": app,
        "yaml": app / "connectors.yaml",
        "broker_env": app / "broker.env",
        "example": app / "connectors.yaml.example",
        "connector_env": app / "connector.env",
        "venv": app / "venv",
        "logs": home / "Library/Logs/remotellm",
        "agents": home / "Library/LaunchAgents",
    }


@pytest.mark.parametrize("role", ROLES)
def test_macos_install_layout_and_plist(role: str, tmp_path: Path) -> None:
    home = tmp_path / "home"
    install(MACOS, home, "--role", role, "--broker-url", "https://b.example.com", REMOTELLM_CONNECTOR_TOKEN="ct-mac")
    p = mac_paths(home)
    assert mode(p["app"]) == 0o700
    assert mode(p["logs"]) == 0o700
    assert mode(p["logs"] / f"{role}.log") == 0o600
    secrets = [p["yaml"], p["broker_env"]] if role == "broker" else [p["connector_env"]]
    for secret in secrets:
        assert mode(secret) == 0o600, secret
    installed = p["agents"] / f"com.remotellm.{role}.plist"
    assert mode(installed) == 0o600
    assert "@HOME@" not in installed.read_text()
    plist = plistlib.loads(installed.read_bytes())
    template = plistlib.loads(PLISTS[role].read_bytes())
    # The program the plist names is the one the script created.
    program = plist["ProgramArguments"][0]
    assert program == template["ProgramArguments"][0].replace("@HOME@", str(home))
    assert program == str(p["venv"] / "bin/python")
    assert os.access(program, os.X_OK)
    assert plist["ProgramArguments"][1:3] == ["-m", role]
    assert plist["StandardErrorPath"] == str(p["logs"] / f"{role}.log")
    assert Path(plist["WorkingDirectory"]).is_dir()
    env = plist["EnvironmentVariables"]
    if role == "broker":
        assert plist["ProgramArguments"][3:] == ["--connector-config", str(p["yaml"])]
        assert p["example"].read_text() == EXAMPLE.read_text()
        assert set(env) == {"PYTHONUNBUFFERED"}  # broker.env has only comments
    else:
        assert env["REMOTELLM_CONNECTOR_TOKEN"] == "ct-mac"
        assert env["REMOTELLM_BROKER_URL"] == "https://b.example.com"
        assert env["REMOTELLM_LLM_URL"] == "http://127.0.0.1:11434"


def test_macos_install_twice_changes_nothing_until_the_env_file_changes(tmp_path: Path) -> None:
    home = tmp_path / "home"
    install(MACOS, home, "--role", "broker")
    install(MACOS, home, "--role", "connector", REMOTELLM_CONNECTOR_TOKEN="ct-1")
    before = snapshot(home)
    second = install(MACOS, home, "--role", "connector", REMOTELLM_CONNECTOR_TOKEN="ct-other")
    install(MACOS, home, "--role", "broker")
    assert snapshot(home) == before
    assert not CHANGE_REPORTED.search(second.stdout), second.stdout

    # Editing connector.env and running again rewrites the plist (and nothing else).
    p = mac_paths(home)
    p["connector_env"].write_text(p["connector_env"].read_text().replace("ct-1", "ct-2"))
    after_edit = snapshot(home)
    install(MACOS, home, "--role", "connector")
    changed = {k for k in set(after_edit) | set(snapshot(home)) if after_edit.get(k) != snapshot(home).get(k)}
    assert changed == {"Library/LaunchAgents/com.remotellm.connector.plist", "Library/LaunchAgents"}
    plist = plistlib.loads((p["agents"] / "com.remotellm.connector.plist").read_bytes())
    assert plist["EnvironmentVariables"]["REMOTELLM_CONNECTOR_TOKEN"] == "ct-2"


def test_macos_uninstall_keeps_secrets_unless_purge(tmp_path: Path) -> None:
    home = tmp_path / "home"
    install(MACOS, home, "--role", "broker")
    install(MACOS, home, "--role", "connector", REMOTELLM_CONNECTOR_TOKEN="ct-1")
    p = mac_paths(home)

    install(MACOS, home, "--role", "connector", "--uninstall")
    assert not (p["agents"] / "com.remotellm.connector.plist").exists()
    assert p["connector_env"].exists()
    assert (p["venv"] / "bin/python").exists()  # the broker still uses it

    install(MACOS, home, "--role", "broker", "--uninstall")
    assert not (p["agents"] / "com.remotellm.broker.plist").exists()
    assert not p["venv"].exists() and not p["example"].exists()
    assert p["yaml"].exists() and p["broker_env"].exists()

    install(MACOS, home, "--role", "broker", "--uninstall", "--purge")
    install(MACOS, home, "--role", "connector", "--uninstall", "--purge")
    assert not p["app"].exists() and not p["logs"].exists()
    assert [path for path in home.rglob("*") if not path.is_dir()] == []


# --- refusals ----------------------------------------------------------------------------------


@pytest.mark.parametrize("script", [LINUX, MACOS], ids=["linux", "macos"])
@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "--role"),
        (["--role", "gateway"], "broker or connector"),
        (["--role", "broker", "--purge"], "--purge goes with --uninstall"),
        (["--role", "broker", "--frobnicate"], "unknown argument"),
        (["--role", "broker", "--python", "/nonexistent/python3"], "not found"),
    ],
)
def test_refuses_bad_arguments(script: Path, args: list[str], message: str, tmp_path: Path) -> None:
    prefix = tmp_path / "root"
    result = run(["bash", script, "--prefix", prefix, "--no-pip", *args], env=install_env(tmp_path))
    assert result.returncode != 0
    assert message in result.stderr, result.stderr
    assert not prefix.exists()  # nothing is created before the checks pass


def fake_python(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "fake-python"
    path.write_text(f'#!/bin/sh\n{body}\nexec {shlex.quote(sys.executable)} "$@"\n')
    path.chmod(0o755)
    return path


@pytest.mark.parametrize("script", [LINUX, MACOS], ids=["linux", "macos"])
def test_refuses_old_python(script: Path, tmp_path: Path) -> None:
    old = fake_python(tmp_path, 'case "$2" in *version_info*) exit 1;; *python_version*) echo 3.9.6; exit 0;; esac')
    cmd = ["bash", script, "--prefix", tmp_path / "root", "--no-pip", "--role", "broker", "--python", old]
    result = run(cmd, env=install_env(tmp_path))
    assert result.returncode != 0
    assert "3.9.6" in result.stderr and ">= 3.11" in result.stderr, result.stderr
    assert not (tmp_path / "root").exists()


@pytest.mark.parametrize("script", [LINUX, MACOS], ids=["linux", "macos"])
def test_refuses_python_without_venv(script: Path, tmp_path: Path) -> None:
    broken = fake_python(tmp_path, 'case "$2" in *"import venv"*) exit 1;; esac')
    cmd = ["bash", script, "--prefix", tmp_path / "root", "--no-pip", "--role", "broker", "--python", broken]
    result = run(cmd, env=install_env(tmp_path))
    assert result.returncode != 0
    assert "venv" in result.stderr, result.stderr
    assert not (tmp_path / "root").exists()


def test_linux_refuses_non_root_without_prefix(tmp_path: Path) -> None:
    # As root (CI, a fresh machine), the check is proven as nobody: root would pass it.
    as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if os.geteuid() == 0 else []
    result = run([*as_nobody, "bash", LINUX, "--role", "broker", "--no-pip"], env=install_env(tmp_path))
    assert result.returncode != 0
    assert "must be run as root" in result.stderr


@pytest.mark.skipif(sys.platform == "darwin", reason="on macOS this would install a real LaunchAgent")
def test_macos_script_refuses_a_service_install_off_macos(tmp_path: Path) -> None:
    # HOME is a temp dir: even a regression could not touch the real home.
    result = run(["bash", MACOS, "--role", "broker", "--no-pip"], env=install_env(tmp_path))
    assert result.returncode != 0
    assert "macOS installer" in result.stderr or "not as root" in result.stderr, result.stderr
    assert not (tmp_path / "Library").exists()


# --- the scripts themselves ----------------------------------------------------------------------


@pytest.mark.parametrize("script", [LINUX, MACOS, COMMON], ids=["linux", "macos", "common"])
def test_script_syntax_and_shellcheck(script: Path) -> None:
    assert script.stat().st_mode & stat.S_IXUSR, f"{script.name} is not executable"
    syntax = run(["bash", "-n", script])
    assert syntax.returncode == 0, syntax.stderr
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not found (Debian/Ubuntu: apt-get install shellcheck)")
    result = run([shellcheck, script])
    assert result.returncode == 0, result.stdout


@pytest.mark.slow  # a real pip install from the package index: a minute or so
def test_linux_install_with_pip(tmp_path: Path) -> None:
    # From a copy of the checkout: pip builds in the source tree, and the source must not
    # change between the two runs (a changed source is reinstalled: that is the upgrade path).
    source = tmp_path / "src"
    junk = shutil.ignore_patterns(".*", "build", "*.egg-info", "__pycache__", "bench", "tests")
    shutil.copytree(REPO, source, ignore=junk)
    prefix = tmp_path / "root"
    cmd = ["bash", source / "deploy/install-linux.sh", "--prefix", prefix, "--role", "broker"]
    first = run(cmd, env=install_env(tmp_path), timeout=900)
    assert first.returncode == 0, first.stderr
    python = linux_paths(prefix)["python"]
    check = run([python, "-m", "broker", "check-config", EXAMPLE])
    assert check.returncode == 0 and check.stdout.startswith("ok:"), check
    before = snapshot(prefix)
    second = run(cmd, env=install_env(tmp_path), timeout=900)
    assert second.returncode == 0, second.stderr
    assert "installed remotellm" not in second.stdout  # the same source is not reinstalled
    assert snapshot(prefix) == before
