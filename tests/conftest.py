from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers import PostgresServer, postgres_workdir, start_postgres
from tests.support import Stack


@pytest.fixture
def stack(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Stack]:
    """Processes for one test; their logs are printed when the test fails."""
    procs = Stack(tmp_path)
    yield procs
    procs.close()
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(procs.logs(tail=6000))


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


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report
