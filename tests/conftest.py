"""Fixtures: tiny CIFAR-format archives, a local HTTP server that serves them, the real
params.yaml to shrink, session-wide PostgreSQL and MLflow servers (helpers in helpers.py), and the
fault tests' sweeps on them (fault_sweeps.py)."""

from __future__ import annotations

import copy
import http.server
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import (
    ROOT,
    ArchiveServer,
    MlflowServer,
    Postgres,
    TinyCifar,
    archive_handler,
    make_tiny_cifar,
    start_mlflow_server,
    start_postgres,
    write_binary_archive,
    write_python_archive,
)

# pytest-xdist hands out whole files (--dist=loadfile) in collection order, each worker holding
# the next one in reserve. The longest files first, as measured (seconds on 2 cores, 2026-12-06),
# keep both workers busy to the end: alphabetical order left the three longest for last.
LONGEST_FIRST = (
    "test_sweep_faults.py",  # 677
    "test_tune.py",  # 523
    "test_sweep_outages.py",  # 518
    "test_pipeline.py",  # 259
    "test_reproduce.py",  # 189
    "test_experiments.py",  # 171
    "test_slurm.py",  # 156
    "test_scale_out.py",  # 135
    "test_tracking.py",  # 114
    "test_fit.py",  # 48; the rest take seconds
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: each file keeps its own order


@pytest.fixture(scope="session")
def tiny() -> TinyCifar:
    return make_tiny_cifar()


@pytest.fixture(scope="session")
def python_archive(tmp_path_factory: pytest.TempPathFactory, tiny: TinyCifar) -> Path:
    return write_python_archive(
        tmp_path_factory.mktemp("archives") / "cifar-10-python.tar.gz", tiny
    )


@pytest.fixture(scope="session")
def binary_archive(tmp_path_factory: pytest.TempPathFactory, tiny: TinyCifar) -> Path:
    return write_binary_archive(
        tmp_path_factory.mktemp("archives") / "cifar-10-binary.tar.gz", tiny
    )


@pytest.fixture
def http_server() -> Iterator[ArchiveServer]:
    state = ArchiveServer()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), archive_handler(state))
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def params_dict() -> dict[str, Any]:
    """The real params.yaml, parsed, to be shrunk by each test."""
    return copy.deepcopy(yaml.safe_load((ROOT / "params.yaml").read_text()))


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    server = start_postgres()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def mlflow_server(
    postgres: Postgres, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MlflowServer]:
    """A real `mlflow server` on 127.0.0.1 with basic auth and the PostgreSQL cluster as its
    backend store."""
    server = start_mlflow_server(
        postgres.create_database("mlflow"), tmp_path_factory.mktemp("artifacts")
    )
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def fault_sweep(
    tmp_path: Path, postgres: Postgres, mlflow_server: MlflowServer
) -> Callable[..., Any]:
    """Makes tiny sweeps of three workers on PostgreSQL and the MLflow server (fault_sweeps.py)."""
    from tests.fault_sweeps import make_fault_sweep

    return make_fault_sweep(tmp_path, postgres, mlflow_server)
