"""What the tests and benchmarks share: tiny CIFAR-format archives in both layouts, a local HTTP
server's handler, the real params.yaml shrunk for tests, project copies, and throwaway PostgreSQL
and MLflow servers."""

from __future__ import annotations

import atexit
import contextlib
import copy
import hashlib
import http.server
import io
import os
import pickle
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]


CLASS_NAMES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]  # fmt: skip


@dataclass
class TinyCifar:
    """Batches as CIFAR stores them: uint8 (N, 3072) channel planes and int labels."""

    train_batches: list[tuple[np.ndarray, list[int]]]
    test_batch: tuple[np.ndarray, list[int]]

    @property
    def train_labels(self) -> np.ndarray:
        return np.concatenate([labels for _, labels in self.train_batches])

    @staticmethod
    def planes_to_images(pixels: np.ndarray) -> np.ndarray:
        return pixels.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def make_tiny_cifar(per_class: int = 4, test_per_class: int = 3, seed: int = 0) -> TinyCifar:
    """5 training batches of `per_class` images per class each, and a test batch.

    Each class has its own mean colour, so a model can learn something in an epoch or two.
    """
    rng = np.random.default_rng(seed)

    def batch(n_per_class: int) -> tuple[np.ndarray, list[int]]:
        labels = np.repeat(np.arange(10), n_per_class)
        rng.shuffle(labels)
        base = (labels[:, None] * 25).astype(np.int16)
        noise = rng.integers(-20, 21, size=(len(labels), 3072))
        pixels = np.clip(base + 20 + noise, 0, 255).astype(np.uint8)
        return pixels, [int(label) for label in labels]

    return TinyCifar([batch(per_class) for _ in range(5)], batch(test_per_class))


class _Py2Pickler(pickle._Pickler):  # type: ignore[name-defined]
    """Writes bytes as Python 2 `str` opcodes, as cPickle did for the official batches.

    (Python 3 writes protocol-2 bytes as calls to _codecs.encode, which the official files,
    and so the project's restricted unpickler, never use.)
    """

    dispatch = pickle._Pickler.dispatch.copy()  # type: ignore[attr-defined]

    def save_bytes(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_bytes


def py2_pickle(obj: Any) -> bytes:
    """Protocol 2 with Python 2 strings, like the official cPickle files."""
    buffer = io.BytesIO()
    _Py2Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


def _add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    archive.addfile(info, io.BytesIO(data))


def write_python_archive(
    path: Path, tiny: TinyCifar, extra: dict[str, bytes] | None = None
) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        folder = tarfile.TarInfo("cifar-10-batches-py")
        folder.type = tarfile.DIRTYPE
        archive.addfile(folder)
        meta = {b"label_names": [n.encode() for n in CLASS_NAMES], b"num_vis": 3072}
        _add(archive, "cifar-10-batches-py/batches.meta", py2_pickle(meta))
        for i, (pixels, labels) in enumerate(tiny.train_batches, start=1):
            batch = {b"batch_label": b"training", b"labels": labels, b"data": pixels}
            _add(archive, f"cifar-10-batches-py/data_batch_{i}", py2_pickle(batch))
        pixels, labels = tiny.test_batch
        batch = {b"batch_label": b"testing", b"labels": labels, b"data": pixels}
        _add(archive, "cifar-10-batches-py/test_batch", py2_pickle(batch))
        for name, data in (extra or {}).items():
            _add(archive, name, data)
    return path


def write_binary_archive(path: Path, tiny: TinyCifar) -> Path:
    def records(pixels: np.ndarray, labels: list[int]) -> bytes:
        return np.hstack([np.array(labels, dtype=np.uint8)[:, None], pixels]).tobytes()

    with tarfile.open(path, "w:gz") as archive:
        _add(
            archive,
            "cifar-10-batches-bin/batches.meta.txt",
            ("\n".join(CLASS_NAMES) + "\n\n").encode(),
        )
        for i, batch in enumerate(tiny.train_batches, start=1):
            _add(archive, f"cifar-10-batches-bin/data_batch_{i}.bin", records(*batch))
        _add(archive, "cifar-10-batches-bin/test_batch.bin", records(*tiny.test_batch))
    return path


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class ArchiveServer:
    """Serves registered files on 127.0.0.1; honours Range; can cut a response or corrupt it."""

    port: int = 0
    files: dict[str, bytes] = field(default_factory=dict)
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Range header)
    cut_responses: int = 0  # how many of the next responses to cut short
    cut_at: int = 0  # bytes of body sent before a cut response is closed
    corrupt: bool = False  # flip bytes in the middle of each body

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"


def archive_handler(server_state: ArchiveServer) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
            pass

        def do_GET(self) -> None:
            name = self.path.lstrip("/")
            range_header = self.headers.get("Range")
            server_state.requests.append((name, range_header))
            data = server_state.files.get(name)
            if data is None:
                self.send_error(404, "Not Found")
                return
            if server_state.corrupt:
                middle = len(data) // 2
                data = (
                    data[:middle]
                    + bytes(b ^ 0xFF for b in data[middle : middle + 64])
                    + data[middle + 64 :]
                )
            start = 0
            if range_header and range_header.startswith("bytes="):
                start = int(range_header[len("bytes=") :].split("-")[0])
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            body = data[start:]
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            if server_state.cut_responses > 0:
                server_state.cut_responses -= 1
                self.wfile.write(body[: server_state.cut_at])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            self.wfile.write(body)

    return Handler


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def shrink(params: dict[str, Any], archive_sha256: str | None = None) -> dict[str, Any]:
    """The real params made small enough for the tiny archives (200 training images)."""
    params = copy.deepcopy(params)
    params["data"].update(sha256=archive_sha256, retries=2, timeout=5)
    params["preprocess"]["validation_size"] = 30
    return params


def tiny_params(
    archive: Path, train: dict[str, Any] | None = None, tune: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The shipped params for a tiny archive: a narrow network (5,934 parameters), 2 epochs."""
    params = shrink(yaml.safe_load((ROOT / "params.yaml").read_text()), sha256_of(archive))
    params["model"].update(conv_filters=[4, 8], dense_units=16)
    # Half an epoch of warm-up: the shipped warm-up is longer than a tiny run.
    params["train"].update({"epochs": 2, "batch_size": 16, "warmup_epochs": 0.5, **(train or {})})
    params["tune"].update(tune or {})
    return params


def tiny_project(
    tmp: Path,
    train: dict[str, Any] | None = None,
    tune: dict[str, Any] | None = None,
    clone: bool = False,
) -> tuple[Path, dict[str, str]]:
    """A fresh repository with tiny params, and the environment its stages need (CIFAR10_URL).
    `clone`: all that a clone holds (committed outputs too), not just the pipeline's files."""
    archive = write_python_archive(tmp / "cifar.tar.gz", make_tiny_cifar())
    project = (clone_project if clone else copy_project)(tmp / "project")
    write_params(project, tiny_params(archive, train, tune))
    return project, {"CIFAR10_URL": str(archive)}


STUDY = "tiny-sweep"  # the tests' sweeps
# A sweep small enough for tests: 3 trials of 2 epochs, pruning from the first epoch, and
# heartbeats fast enough to see a dead worker's trial failed within seconds. It tunes the four
# params a sweep tunes at the least (params.yaml's own space tunes more).
SWEEP = {
    "space": {
        "train.learning_rate": {"low": 0.01, "high": 0.2, "log": True},
        "train.momentum": {"low": 0.8, "high": 0.95, "log": False},
        "model.conv_dropout": {"low": 0.0, "high": 0.3, "log": False},
        "model.dense_dropout": {"low": 0.1, "high": 0.6, "log": False},
    },
    "study_name": STUDY,
    "storage": "sqlite:///optuna.db",
    "n_trials": 3,
    "epochs": 2,
    "train_fraction": 1.0,
    "startup_trials": 1,
    "warmup_epochs": 0,
    "heartbeat_seconds": 1,
    "grace_seconds": 3,
}


_PREPARED: list[tuple[Path, Path]] = []  # this test process's prepared sweep project, archive


def sweep_project(tmp: Path, own_mlflow: bool = True, **tune: Any) -> tuple[Path, dict[str, str]]:
    """A tiny repository with its data prepared, and (by default) its own MLflow store.

    The first call in a test process prepares one (`dvc repro preprocess`); each call copies it,
    then writes its own `tune` values, which no prepared stage reads."""
    if not _PREPARED:
        base = Path(tempfile.mkdtemp(prefix="pipeline-sweep-"))
        atexit.register(shutil.rmtree, base, True)
        template, env = tiny_project(base, tune=SWEEP)
        result = run(["dvc", "repro", "preprocess"], template, **env)
        assert result.returncode == 0, result.stderr
        _PREPARED.append((template, Path(env["CIFAR10_URL"])))
    template, archive = _PREPARED[0]
    project = shutil.copytree(template, tmp / "project", symlinks=True)
    write_params(project, tiny_params(archive, tune={**SWEEP, **tune}))
    env = {"CIFAR10_URL": str(archive)}
    if own_mlflow:
        env["MLFLOW_TRACKING_URI"] = f"sqlite:///{project / 'mlflow.db'}"
    return project, env


def write_params(directory: Path, params: dict[str, Any]) -> Path:
    path = directory / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def run_env(**extra: str) -> dict[str, str]:
    """The environment for a stage subprocess: this venv's python first on PATH."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("CIFAR10_URL", None)
    env.update(extra)
    return env


def run(cmd: list[str], cwd: Path, **extra_env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, env=run_env(**extra_env), capture_output=True, text=True)


def copy_project(destination: Path) -> Path:
    """A fresh git + DVC repository holding this project's pipeline files (not its outputs)."""
    destination.mkdir(parents=True, exist_ok=True)
    for name in (  # the sweep's definition, not the outputs of the sweep that is committed
        "pipeline",
        "sweep/dvc.yaml",
        "recipes",
        "dvc.yaml",
        "params.yaml",
        ".gitignore",
        "pyproject.toml",
        ".dvc/config",  # names the offline plots page
        ".dvc/plots/offline.html",
        ".dvc/.gitignore",
        ".dvcignore",
    ):
        copy_into(destination, name)
    return commit_all(destination)


def clone_project(destination: Path) -> Path:
    """What `git clone` of this repository gives a user, outputs included: every tracked file
    (as the working tree has it) and every new file git would not ignore."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, check=True,
    ).stdout.decode()  # fmt: skip
    for name in filter(None, listed.split("\0")):
        if (ROOT / name).is_file():  # not a file deleted in the working tree
            copy_into(destination, name)
    return commit_all(destination)


def copy_into(destination: Path, name: str) -> None:
    source = ROOT / name
    if source.is_dir():
        shutil.copytree(source, destination / name, ignore=shutil.ignore_patterns("__pycache__"))
    else:
        (destination / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, destination / name)


def commit_all(project: Path) -> Path:
    """Makes `project` a git repository whose one commit holds all its files."""
    for cmd in (
        ["git", "init", "-q"],
        ["git", "add", "-A"],
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"],
    ):
        result = run(cmd, project)
        assert result.returncode == 0, result.stderr
    return project


def browser() -> str:
    """Headless Chromium, by the names Debian and Ubuntu give it (`make test` checks for it)."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    assert found, "Chromium not found: `make test` names how to install it"
    return found


def _postgres_bin(name: str) -> str:
    found = shutil.which(name) or next(
        iter(sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))), None
    )
    if found is None:
        raise RuntimeError(
            f"PostgreSQL's {name} not found: .ci/run installs it (apt-get install postgresql)"
        )
    return str(found)


POSTGRES_PASSWORD = "pg-test-secret"


@dataclass
class Postgres:
    host: str
    port: int
    user: str
    password: str
    base: Path
    as_user: list[str]

    def url(self, database: str) -> str:
        return f"postgresql://{self.user}:{self.password}@{self.host}:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.url("postgres"), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def pg_ctl(self, *args: str) -> None:
        subprocess.run(
            [*self.as_user, _postgres_bin("pg_ctl"), "-D", str(self.base / "data"), *args],
            check=True, capture_output=True,
        )  # fmt: skip

    def restart(self) -> None:
        """`pg_ctl restart -m fast`, as an administrator would: every connection is cut."""
        self.pg_ctl("-l", str(self.base / "log"), "-m", "fast", "-w", "restart")

    def stop(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.pg_ctl("-m", "immediate", "stop")
        shutil.rmtree(self.base, ignore_errors=True)


def start_postgres() -> Postgres:
    """A throwaway PostgreSQL cluster on 127.0.0.1 with password authentication, run as
    `postgres` when we are root."""
    base = Path(tempfile.mkdtemp(prefix="pipeline-pg-"))  # under /tmp: reachable by `postgres`
    (base / "pwfile").write_text(POSTGRES_PASSWORD + "\n")
    as_user: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        shutil.chown(base, "postgres", "postgres")
        shutil.chown(base / "pwfile", "postgres", "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = base / "data", free_port()
    subprocess.run(
        [*as_user, _postgres_bin("initdb"), "-D", str(data), "-U", "pipeline", "--auth=scram-sha-256",
         f"--pwfile={base / 'pwfile'}", "-E", "UTF8"],
        check=True, capture_output=True,
    )  # fmt: skip
    options = f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c max_connections=200"
    subprocess.run(
        [*as_user, _postgres_bin("pg_ctl"), "-D", str(data), "-l", str(base / "log"), "-o", options, "-w", "start"],
        check=True, capture_output=True,
    )  # fmt: skip
    return Postgres("127.0.0.1", port, "pipeline", POSTGRES_PASSWORD, base, as_user)


MLFLOW_USER, MLFLOW_PASSWORD = "sweeper", "mlflow-test-secret"


MLFLOW_ADMIN_PASSWORD = "mlflow-admin-secret"


@dataclass
class MlflowServer:
    """A real `mlflow server` with MLflow's basic-auth app; workers log in as `user`."""

    url: str
    process: subprocess.Popen[bytes]
    command: list[str]
    env: dict[str, str]
    user: str = MLFLOW_USER
    password: str = MLFLOW_PASSWORD

    def credentials(self) -> dict[str, str]:
        """The variables a worker (or a test's MlflowClient) needs to log in."""
        return {"MLFLOW_TRACKING_USERNAME": self.user, "MLFLOW_TRACKING_PASSWORD": self.password}

    def client(self) -> Any:
        from mlflow import MlflowClient

        os.environ.update(self.credentials())  # read by MLflow's client at each request
        return MlflowClient(tracking_uri=self.url)

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        self.process.wait(timeout=30)

    def restart_after(self, seconds: float) -> None:
        """Stops the server, waits `seconds`, and starts it again on the same port."""
        self.stop()
        time.sleep(seconds)
        self.process = _start_mlflow_process(self.command, self.env)
        _wait_healthy(self.url, self.process)


def _start_mlflow_process(command: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip


def _wait_healthy(url: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"mlflow server on {url} did not start (exit code {process.poll()})")
        time.sleep(0.5)


def start_mlflow_server(
    backend_uri: str, artifacts: Path, workers: int = 1, **settings: str
) -> MlflowServer:
    """`mlflow server --app-name basic-auth` on 127.0.0.1, as the README's recipe starts it,
    with a user for the workers (users live in their own SQLite file beside the artifacts).
    `settings`: more of the server's environment (its database pool's size, say)."""
    port = free_port()
    config = artifacts.parent / f"mlflow-auth-{port}.ini"
    config.write_text(
        (ROOT / "sweep/mlflow-auth.ini")
        .read_text()
        .replace("sqlite:///mlflow-auth.db", f"sqlite:///{artifacts.parent / f'users-{port}.db'}")
    )
    command = [
        "mlflow", "server", "--app-name", "basic-auth", "--backend-store-uri", backend_uri,
        "--artifacts-destination", str(artifacts), "--host", "127.0.0.1", "--port", str(port),
        "--workers", str(workers),
    ]  # fmt: skip
    env = run_env(
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
        MLFLOW_AUTH_CONFIG_PATH=str(config),
        MLFLOW_AUTH_ADMIN_PASSWORD=MLFLOW_ADMIN_PASSWORD,
        MLFLOW_FLASK_SERVER_SECRET_KEY="test-secret-key",
        **settings,
    )
    url = f"http://127.0.0.1:{port}"
    process = _start_mlflow_process(command, env)
    _wait_healthy(url, process)
    import requests

    created = requests.post(
        f"{url}/api/2.0/mlflow/users/create",
        json={"username": MLFLOW_USER, "password": MLFLOW_PASSWORD},
        auth=("admin", MLFLOW_ADMIN_PASSWORD),
        timeout=30,
    )
    assert created.ok, created.text
    return MlflowServer(url, process, command, env)


@dataclass
class Slurm:
    """A one-node Slurm cluster on this machine: slurmctld and slurmd, as root, with MUNGE."""

    base: Path
    daemons: list[subprocess.Popen[bytes]]

    @property
    def env(self) -> dict[str, str]:
        """What sbatch, squeue, scancel and scontrol need to find this cluster."""
        return {"SLURM_CONF": str(self.base / "slurm.conf")}

    def command(self, *args: str) -> str:
        result = subprocess.run(
            args, env={**os.environ, **self.env}, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, (args, result.stderr)
        return result.stdout

    def log(self) -> str:
        return "".join(
            (self.base / name).read_text(errors="replace")
            for name in ("slurmctld.log", "slurmd.log")
            if (self.base / name).exists()
        )

    def stop(self) -> None:
        for daemon in self.daemons:
            daemon.terminate()
        for daemon in self.daemons:
            with contextlib.suppress(subprocess.TimeoutExpired):
                daemon.wait(timeout=30)
        shutil.rmtree(self.base, ignore_errors=True)


def start_slurm() -> Slurm:
    """slurmctld and slurmd in the foreground on free ports, with their state, spool and logs
    in a folder of their own (SLURM_CONF names it: nothing under /etc is changed). Needs root,
    Debian's slurm-wlm and munge (.ci/run installs them), and starts munged if none runs."""
    assert os.geteuid() == 0, "a Slurm cluster's daemons run as root: run the tests as root"
    for daemon in ("slurmctld", "slurmd", "munged"):
        assert shutil.which(daemon) or Path(f"/usr/sbin/{daemon}").exists(), (
            f"{daemon} not found: apt-get install slurm-wlm munge (.ci/run does)"
        )
    if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode != 0:
        Path("/run/munge").mkdir(exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True)
    base = Path(tempfile.mkdtemp(prefix="pipeline-slurm-"))
    for folder in ("state", "spool"):
        (base / folder).mkdir()
    (base / "slurm.conf").write_text(
        f"""ClusterName=pipeline
SlurmctldHost=localhost
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation={base / "state"}
SlurmdSpoolDir={base / "spool"}
SlurmctldPidFile={base / "slurmctld.pid"}
SlurmdPidFile={base / "slurmd.pid"}
SlurmctldLogFile={base / "slurmctld.log"}
SlurmdLogFile={base / "slurmd.log"}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
KillWait=10
NodeName=localhost CPUs={os.cpu_count()} RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
"""
    )
    env = {**os.environ, "SLURM_CONF": str(base / "slurm.conf")}
    daemons = [
        subprocess.Popen(["slurmctld", "-D", "-i"], env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL),
        subprocess.Popen(["slurmd", "-D", "-N", "localhost"], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
    ]  # fmt: skip
    slurm = Slurm(base, daemons)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        state = subprocess.run(
            ["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True
        ).stdout.strip()
        if state == "idle":
            return slurm
        time.sleep(0.5)
    slurm.stop()
    raise RuntimeError(f"the Slurm node did not come up within 60 s:\n{slurm.log()[-3000:]}")
