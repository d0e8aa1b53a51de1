from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers import PostgresServer, postgres_workdir, start_postgres
from tests.support import Stack


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    """Processes for one test."""
    procs = Stack(tmp_path)
    yield procs
    procs.close()


@pytest.fixture(scope="module")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    """One PostgreSQL server for a test module; each test makes the databases it needs."""
    stack = Stack(tmp_path_factory.mktemp("postgres-logs"))
    with postgres_workdir() as workdir:
        server = start_postgres(stack, workdir)
        try:
            yield server
        finally:
            server.stop()
            stack.close()


LOG_TAIL = 6000  # characters of each process's log shown with a failure


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A test that failed (or whose fixtures failed to start) shows the processes' logs of
    every stack open or closed since the last report (see Stack)."""
    report: pytest.TestReport = yield
    if report.failed and report.when in ("setup", "call"):
        for stack in [*Stack.live, *Stack.just_closed]:
            report.sections.append((f"processes of {stack.log_dir.name}", stack.logs(tail=LOG_TAIL)))
    Stack.just_closed.clear()
    return report
