from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import Stack


@pytest.fixture
def stack(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Stack]:
    """Processes for one test; their logs are printed when the test fails."""
    procs = Stack(tmp_path)
    yield procs
    procs.close()
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(procs.logs()[-20000:])


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report
