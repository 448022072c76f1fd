"""The session's server: ``python -m service`` over the built default repository."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from servers import RunningServer, running_server


@pytest.fixture(scope="session")
def server(
    built_repository: tuple[Path, Path, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    with running_server(built_repository[0], tmp_path_factory.mktemp("server")) as running:
        yield running
