"""Real servers for integration tests: PostgreSQL and `mlflow server`, on loopback and free ports.

Every server runs in its own process group and is stopped with bounded waits, so a failing test
leaves no process behind.
"""

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import NoReturn

import psycopg2
import pytest

BIN = Path(sys.executable).parent
POSTGRES_BIN = Path("/usr/lib/postgresql/15/bin")
LOOPBACK = "127.0.0.1"
# Environment for every server process: no usage telemetry (nothing may leave loopback) and no
# MLflow job runner (extra worker processes that these tests never use, on a 2-core machine).
QUIET_ENV = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
}


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def unavailable(reason: str) -> NoReturn:
    """CI installs everything these tests need, so there a gap is a failure; locally it is a skip."""
    if in_ci():
        pytest.fail(f"{reason} (CI must provide it: see .ci/run)", pytrace=False)
    pytest.skip(reason)


def require_executable(path: Path, package: str) -> Path:
    if not (path.is_file() and os.access(path, os.X_OK)):
        unavailable(f"{path} not found: install the Debian package {package}")
    return path


def free_port() -> int:
    """A port nobody listens on now; the server binds it a moment later, a race these tests accept."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def log_tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.is_file() else "(no log)"


def stop_process_group(proc: subprocess.Popen, grace: float = 15.0) -> None:
    """SIGTERM the whole group (server and workers), then SIGKILL whatever is still there."""
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)
    # The leader can exit before its children; killing the group again catches stragglers.
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=5)


def wait_for_http(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    """Poll `url` until it answers 200; fail early, with the server's log, if the server dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before answering {url}:\n{log_tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f}s:\n{log_tail(log)}")


@contextmanager
def postgres_server(timeout: float = 60.0) -> Iterator[str]:
    """A throwaway PostgreSQL 15 cluster with database and role `mlflow`; yields its SQLAlchemy URI.

    PostgreSQL refuses to run as root, so under root the cluster belongs to the `postgres` user and
    lives in a directory of its own under the system temp dir (pytest's tmp_path is root-only).
    """
    initdb = require_executable(POSTGRES_BIN / "initdb", "postgresql-15")
    pg_ctl = require_executable(POSTGRES_BIN / "pg_ctl", "postgresql-15")
    as_owner: list[str] = []
    base = Path(tempfile.mkdtemp(prefix="eventcoder-pg-"))
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(base)
            unavailable("running as root and there is no `postgres` user to own the cluster")
        os.chown(base, owner.pw_uid, owner.pw_gid)
        as_owner = ["runuser", "-u", "postgres", "--"]

    data, log = base / "data", base / "postgres.log"
    superuser_password, password = os.urandom(12).hex(), os.urandom(12).hex()
    port = free_port()
    try:
        password_file = base / "superuser-password"
        password_file.write_text(superuser_password + "\n")
        if as_owner:
            shutil.chown(password_file, "postgres", "postgres")
        _run(
            [*as_owner, str(initdb), "-D", str(data), "-U", "postgres", "--auth=scram-sha-256",
             f"--pwfile={password_file}", "--encoding=UTF8", "--no-instructions", "--no-sync"],
            timeout, log,
        )  # fmt: skip
        with (data / "postgresql.conf").open("a") as conf:
            conf.write(
                f"listen_addresses = '{LOOPBACK}'\n"
                f"port = {port}\n"
                # The default socket dir /var/run/postgresql may be missing or belong to a system cluster.
                f"unix_socket_directories = '{base}'\n"
                # A test database need not survive a crash; skipping fsync makes MLflow's migrations fast.
                "fsync = off\n"
                "full_page_writes = off\n"
            )
        _run([*as_owner, str(pg_ctl), "start", "-D", str(data), "-l", str(log), "-w", "-t", str(int(timeout))],
             timeout + 10, log)  # fmt: skip
        admin = psycopg2.connect(
            host=LOOPBACK, port=port, user="postgres", password=superuser_password, dbname="postgres"
        )
        try:
            admin.autocommit = True  # CREATE DATABASE cannot run inside a transaction
            with admin.cursor() as cursor:
                cursor.execute(f"CREATE ROLE mlflow LOGIN PASSWORD '{password}'")
                cursor.execute("CREATE DATABASE mlflow OWNER mlflow")
        finally:
            admin.close()
        # SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3; the `team` extra installs psycopg2.
        yield f"postgresql+psycopg2://mlflow:{password}@{LOOPBACK}:{port}/mlflow"
    finally:
        _stop_postgres(as_owner, pg_ctl, data)
        shutil.rmtree(base, ignore_errors=True)


def _run(command: list[str], timeout: float, log: Path) -> None:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}\n{log_tail(log)}")


def _stop_postgres(as_owner: list[str], pg_ctl: Path, data: Path) -> None:
    """Fast shutdown (disconnects clients); if that fails, SIGQUIT the postmaster (immediate shutdown)."""
    pid_file = data / "postmaster.pid"
    if not pid_file.is_file():
        return
    try:
        subprocess.run(
            [*as_owner, str(pg_ctl), "stop", "-D", str(data), "-m", "fast", "-w", "-t", "20"],
            check=True, capture_output=True, timeout=30,
        )  # fmt: skip
        return
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
        pass
    try:
        os.kill(int(pid_file.read_text().split()[0]), signal.SIGQUIT)
    except (FileNotFoundError, ProcessLookupError, ValueError):
        return
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and pid_file.exists():
        time.sleep(0.2)


@contextmanager
def mlflow_server(
    backend_store_uri: str,
    artifacts_destination: Path,
    workdir: Path,
    port: int | None = None,
    timeout: float = 120.0,
) -> Iterator[str]:
    """`mlflow server` on loopback, proxying artifacts to `artifacts_destination`; yields its URL.

    The server runs in `workdir`, so anything it would write to its current directory stays there.
    Pass `port` (from free_port) to know the URL before the server is up.
    """
    port = port or free_port()
    url = f"http://{LOOPBACK}:{port}"
    log = workdir / "mlflow-server.log"
    env = {**os.environ, **QUIET_ENV}
    env.pop("MLFLOW_TRACKING_URI", None)
    command = [
        str(BIN / "mlflow"), "server",
        "--backend-store-uri", backend_store_uri,
        "--artifacts-destination", str(artifacts_destination),
        "--host", LOOPBACK,
        "--port", str(port),
        # One worker is plenty for one client and keeps uvicorn from forking on a small machine.
        "--workers", "1",
    ]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(
            command, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        wait_for_http(f"{url}/health", proc, log, timeout)
        yield url
    finally:
        stop_process_group(proc)
