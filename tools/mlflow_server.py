"""A shared MLflow tracking server on PostgreSQL, for development and tests: started and stopped by the project.

    python -m tools.mlflow_server start [--state-dir .mlflow-server] [--port 5000] [--pg-port Q] [--workers 2]
    python -m tools.mlflow_server status|stop [--state-dir .mlflow-server]

`start` runs a PostgreSQL cluster of Debian's package (`make setup-postgres`) and `mlflow server` with that
backend store and proxied artifact storage (clients upload and download artifacts through the server, so
they need no access to its disk). Both listen on 127.0.0.1 only. Pipelines then set
`mlflow.tracking_uri: http://127.0.0.1:PORT` (or MLFLOW_TRACKING_URI).

The state folder (default `.mlflow-server/` in the repository, git-ignored) holds the cluster (pg/data, its
socket folder pg/run), the artifacts (artifacts/), the logs (postgres.log, mlflow.log), the MLflow PID
(mlflow.pid; PostgreSQL's own is pg/data/postmaster.pid), the ports (server.json) and the database password
(pgpass, mode 0600). PostgreSQL takes password (SCRAM) logins from 127.0.0.1 only, with a generated password
that the MLflow server reads from that file (PGPASSFILE), never from its command line. The MLflow server
itself has no authentication: anyone with a shell on this machine can use it (that is what makes it shared).

PostgreSQL refuses to run as root: under root the cluster belongs to the `postgres` system user (created by
Debian's package) and its programs run as that user (`setpriv`, which keeps the PID that we record).

From Python (tests): `start(state_dir, port=None, pg_port=None)` returns an `MlflowServer` (`tracking_uri`,
`artifacts_dir`, `stop()`); `running(...)` is the same as a context manager. Only the standard library is
imported here; the server itself runs with this interpreter, which needs mlflow and psycopg.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tools.orthanc import free_port, pid_alive, port_in_use

REPO = Path(__file__).resolve().parents[1]
DEFAULT_STATE_DIR = REPO / ".mlflow-server"
DEFAULT_PORT = 5000
HOST = "127.0.0.1"
DB_NAME = DB_ROLE = "mlflow"
CLUSTER_OWNER = "postgres"  # the system user of Debian's package, used when we run as root
STATE_FILE, MLFLOW_PID, MLFLOW_LOG, PG_LOG, PGPASS = "server.json", "mlflow.pid", "mlflow.log", "postgres.log", "pgpass"
SETUP_HINT = "run `make setup-postgres` (Debian package postgresql) and `make setup`"


class MlflowServerError(RuntimeError):
    """The tracking server or its PostgreSQL could not be started, reached or stopped."""


class MlflowServerNotInstalled(MlflowServerError):
    """PostgreSQL, psycopg or mlflow is missing."""


# ----------------------------------------------------------------------------- installation
def _version_key(path: Path) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", path.parent.name)) or (0,)


def postgres_bindir() -> Path:
    """The folder of initdb and postgres: $PG_BINDIR, else Debian's newest /usr/lib/postgresql/N/bin, else
    `pg_config --bindir`, else wherever `initdb` is on PATH. (Debian keeps them off PATH, one folder a version.)"""
    def usable(folder: Path) -> bool:
        return all(os.access(folder / exe, os.X_OK) for exe in ("initdb", "postgres", "pg_isready", "createdb"))

    explicit = os.environ.get("PG_BINDIR")
    if explicit:
        if usable(Path(explicit)):
            return Path(explicit)
        raise MlflowServerNotInstalled(f"PG_BINDIR={explicit} has no initdb/postgres; unset it or {SETUP_HINT}")
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=_version_key, reverse=True)
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, timeout=10).stdout.strip()
        candidates.append(Path(out))
    if shutil.which("initdb"):
        candidates.append(Path(shutil.which("initdb")).parent)
    for folder in candidates:
        if usable(folder):
            return folder
    raise MlflowServerNotInstalled(f"PostgreSQL's server programs (initdb, postgres) are not installed: {SETUP_HINT}")


def _is_root() -> bool:
    return os.geteuid() == 0


def check_installed() -> Path:
    """PostgreSQL's bin folder, or MlflowServerNotInstalled saying what to install."""
    bindir = postgres_bindir()
    for module, pip_name in (("mlflow", "mlflow"), ("psycopg", "psycopg[binary]")):
        if importlib.util.find_spec(module) is None:
            raise MlflowServerNotInstalled(f"{sys.executable} cannot import {module} (pip install {pip_name}): "
                                           f"{SETUP_HINT}")
    if _is_root():
        try:
            pwd.getpwnam(CLUSTER_OWNER)
        except KeyError:
            raise MlflowServerNotInstalled(f"running as root, PostgreSQL needs the system user {CLUSTER_OWNER!r} "
                                           f"(created by Debian's package): {SETUP_HINT}") from None
        if shutil.which("setpriv") is None:
            raise MlflowServerNotInstalled("running as root, `setpriv` (util-linux) is needed to run PostgreSQL "
                                           "as its own user")
    return bindir


# ----------------------------------------------------------------------------- processes
def _cmdline(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []


def _runs_with(pid: int, marker: Path) -> bool:
    """Whether `pid` is alive and was started with `marker` (a path of ours) on its command line: a PID
    file can outlive its process, and the PID can be reused by another program meanwhile."""
    return pid_alive(pid) and any(str(marker).encode() in arg for arg in _cmdline(pid))


def _group_alive(pgid: int) -> bool:
    """Whether any non-zombie process is in process group `pgid` (mlflow server's uvicorn and its workers)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[-1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
    return False


def _signal(pid: int, steps: list[tuple[int, float]], group: bool, proc: subprocess.Popen | None) -> None:
    """Send each (signal, seconds to wait) of `steps` in turn until `pid` (with `group`: its whole process
    group) has gone; MlflowServerError if it is still there after the last."""
    def gone() -> bool:
        if proc is not None:
            proc.poll()  # reap our own child, or it stays a zombie
        return not pid_alive(pid) and not (group and _group_alive(pid))

    for sig, wait_s in steps:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, sig) if group else os.kill(pid, sig)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if gone():
                return
            time.sleep(0.05)
    if not gone():
        raise MlflowServerError(f"process {pid} did not exit after signal {steps[-1][0]}")


def _log_tail(log: Path, lines: int = 30) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) or "(empty log)"
    except OSError:
        return "(no log)"


def _as_cluster_owner(cmd: list[str]) -> list[str]:
    """`cmd` run as the cluster's owner: as is, or under root as `postgres` via setpriv (which execs, so the
    PID we get is PostgreSQL's; runuser and su would stay in between as its parent)."""
    if not _is_root():
        return cmd
    return ["setpriv", f"--reuid={CLUSTER_OWNER}", f"--regid={CLUSTER_OWNER}", "--init-groups", "--", *cmd]


# ----------------------------------------------------------------------------- the server
@dataclass
class MlflowServer:
    """A running tracking server of ours: its state folder, ports and PIDs."""

    state_dir: Path
    port: int
    pg_port: int
    mlflow_pid: int | None
    postgres_pid: int | None
    startup_s: float | None = None  # seconds from launch to /health answering (None: found running)
    _procs: dict[str, subprocess.Popen] = field(default_factory=dict, repr=False, compare=False)

    @property
    def tracking_uri(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def artifacts_dir(self) -> Path:
        return self.state_dir / "artifacts"

    @property
    def data_dir(self) -> Path:
        return self.state_dir / "pg" / "data"

    @property
    def backend_store_uri(self) -> str:
        return f"postgresql+psycopg://{DB_ROLE}@{HOST}:{self.pg_port}/{DB_NAME}"  # password: PGPASSFILE

    def mlflow_running(self) -> bool:
        return self.mlflow_pid is not None and _runs_with(self.mlflow_pid, self.artifacts_dir)

    def postgres_running(self) -> bool:
        return self.postgres_pid is not None and _runs_with(self.postgres_pid, self.data_dir)

    def stop(self, timeout_s: float = 20.0) -> None:
        """Stop mlflow server (its whole process group: uvicorn and workers), then PostgreSQL (fast shutdown:
        SIGINT, which ends the sessions, where SIGTERM would wait for them), each by its verified PID."""
        if self.mlflow_running():
            _signal(self.mlflow_pid, [(signal.SIGTERM, timeout_s), (signal.SIGKILL, 10.0)], group=True,
                    proc=self._procs.get("mlflow"))
        if self.postgres_running():
            _signal(self.postgres_pid, [(signal.SIGINT, timeout_s), (signal.SIGQUIT, 5.0), (signal.SIGKILL, 5.0)],
                    group=False, proc=self._procs.get("postgres"))
        for proc in self._procs.values():
            proc.poll()  # reap ours even where another process (`stop` of the CLI) ended them
        with contextlib.suppress(FileNotFoundError):
            (self.state_dir / MLFLOW_PID).unlink()

    def __enter__(self) -> MlflowServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split("\n", 1)[0].strip())  # postmaster.pid: the PID is its first line
    except (OSError, ValueError):
        return None


def status(state_dir: Path = DEFAULT_STATE_DIR) -> MlflowServer | None:
    """What runs from `state_dir`: an MlflowServer whose PIDs are None for a part that is not running, or
    None when neither runs."""
    state_dir = Path(state_dir).resolve()
    try:
        ports = json.loads((state_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(ports, dict) or not {"port", "pg_port"} <= ports.keys():
        return None
    server = MlflowServer(state_dir, int(ports["port"]), int(ports["pg_port"]),
                          _read_pid(state_dir / MLFLOW_PID), _read_pid(state_dir / "pg" / "data" / "postmaster.pid"))
    server.mlflow_pid = server.mlflow_pid if server.mlflow_running() else None
    server.postgres_pid = server.postgres_pid if server.postgres_running() else None
    return server if server.mlflow_pid or server.postgres_pid else None


# ----------------------------------------------------------------------------- PostgreSQL
def _prepare_state(state_dir: Path) -> Path:
    """Create the folders; the cluster's folder belongs to the user PostgreSQL runs as. Returns pg/."""
    for sub in ("", "artifacts", "pg", "pg/run"):
        (state_dir / sub).mkdir(parents=True, exist_ok=True)
    pg = state_dir / "pg"
    # Under root, `postgres` must be able to walk into the folder (x) but needs no listing of it (r).
    state_dir.chmod(0o711 if _is_root() else 0o700)
    pg.chmod(0o700)
    if _is_root():
        owner = pwd.getpwnam(CLUSTER_OWNER)
        for path in (pg, pg / "run"):  # pg/data: initdb creates it, as that user
            os.chown(path, owner.pw_uid, owner.pw_gid)
        blocked = [p for p in state_dir.parents if not os.stat(p).st_mode & 0o001]
        if blocked:
            raise MlflowServerError(f"{blocked[0]} is not searchable by other users, so the PostgreSQL user "
                                    f"{CLUSTER_OWNER!r} cannot reach {pg}; use a state folder elsewhere")
    return pg


def _password(state_dir: Path) -> str:
    """The database password, generated once into pgpass (libpq's format, mode 0600)."""
    path = state_dir / PGPASS
    if path.exists():
        return path.read_text().strip().rsplit(":", 1)[-1]
    password = secrets.token_urlsafe(24)  # no ':' or '\\', which pgpass would need escaped
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(f"{HOST}:*:*:{DB_ROLE}:{password}\n")
    return password


def _run(cmd: list[str], what: str, env: dict | None = None, ok_if: str | None = None) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd="/")
    if done.returncode != 0 and not (ok_if and ok_if in done.stderr):
        raise MlflowServerError(f"{what} failed ({done.returncode}): {(done.stderr or done.stdout).strip()[-2000:]}")


def _init_cluster(bindir: Path, pg: Path, password: str) -> None:
    """initdb pg/data once: superuser `mlflow`, SCRAM password logins for every connection (pg_hba.conf)."""
    if (pg / "data" / "PG_VERSION").exists():
        return
    pwfile = pg / "initdb.pw"
    pwfile.write_text(password + "\n")
    pwfile.chmod(0o600)
    if _is_root():
        owner = pwd.getpwnam(CLUSTER_OWNER)
        os.chown(pwfile, owner.pw_uid, owner.pw_gid)
    try:
        _run(_as_cluster_owner([str(bindir / "initdb"), "-D", str(pg / "data"), "-U", DB_ROLE, "--auth=scram-sha-256",
                                f"--pwfile={pwfile}", "--encoding=UTF8", "--locale=C"]), "initdb")
    finally:
        pwfile.unlink()


def _start_postgres(bindir: Path, state_dir: Path, pg_port: int) -> subprocess.Popen:
    pg = state_dir / "pg"
    cmd = _as_cluster_owner([str(bindir / "postgres"), "-D", str(pg / "data"), "-p", str(pg_port),
                             "-c", f"listen_addresses={HOST}", "-c", f"unix_socket_directories={pg / 'run'}"])
    with (state_dir / PG_LOG).open("ab") as log:
        # Own session: a Ctrl-C in the shell that ran `make mlflow-server` does not reach it.
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd="/",
                                start_new_session=True, close_fds=True)


def _wait_postgres(bindir: Path, proc: subprocess.Popen, pg_port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise MlflowServerError(f"PostgreSQL exited with status {proc.returncode} during start-up")
        ready = subprocess.run([str(bindir / "pg_isready"), "-q", "-h", HOST, "-p", str(pg_port)], timeout=10)
        if ready.returncode == 0:
            return
        time.sleep(0.1)
    raise MlflowServerError(f"PostgreSQL did not accept connections on {HOST}:{pg_port} within {timeout_s:g} s")


# ----------------------------------------------------------------------------- mlflow server
def _server_env(state_dir: Path) -> dict[str, str]:
    env = dict(os.environ, PGPASSFILE=str(state_dir / PGPASS))
    # The GenAI job runner (half a dozen huey consumers) serves nothing the registry needs.
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    return env


def _start_mlflow(server: MlflowServer, workers: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", server.backend_store_uri,
           "--artifacts-destination", str(server.artifacts_dir), "--serve-artifacts",
           "--host", HOST, "--port", str(server.port), "--workers", str(workers)]
    with (server.state_dir / MLFLOW_LOG).open("ab") as log:
        # Own session and process group: stop() ends mlflow's uvicorn and its workers with it.
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                cwd=server.state_dir, env=_server_env(server.state_dir), start_new_session=True,
                                close_fds=True)


def _health(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2.0) as resp:
            resp.read()
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError):
        return 0


def _wait_mlflow(proc: subprocess.Popen, url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise MlflowServerError(f"mlflow server exited with status {proc.returncode} during start-up")
        if _health(url + "/health") == 200:
            return
        time.sleep(0.2)
    raise MlflowServerError(f"mlflow server did not answer {url}/health within {timeout_s:g} s")


def _check_ports(port: int, pg_port: int) -> None:
    for p, flag in ((port, "--port, make mlflow-server MLFLOW_PORT=..."), (pg_port, "--pg-port")):
        if port_in_use(p):
            raise MlflowServerError(f"port {p} is already in use on {HOST}; choose another one ({flag})")


def start(state_dir: Path = DEFAULT_STATE_DIR, port: int | None = None, pg_port: int | None = None, workers: int = 2,
          timeout_s: float = 120.0) -> MlflowServer:
    """Start PostgreSQL (initdb and database `mlflow` on first use) and mlflow server from `state_dir`, and wait
    until /health answers. A None port picks a free one. Raises MlflowServerNotInstalled when a part is missing,
    MlflowServerError when something of ours already runs from `state_dir`, a port is taken, or a part does not
    come up (with the tail of its log; what was started is stopped again)."""
    bindir = check_installed()
    state_dir = Path(state_dir).resolve()
    if status(state_dir) is not None:
        raise MlflowServerError(f"a tracking server (or its PostgreSQL) already runs from {state_dir}; stop it first")
    server = MlflowServer(state_dir, port or free_port(), pg_port or free_port(), None, None)
    _check_ports(server.port, server.pg_port)
    t0 = time.monotonic()
    pg = _prepare_state(state_dir)
    password = _password(state_dir)
    _init_cluster(bindir, pg, password)
    (state_dir / STATE_FILE).write_text(json.dumps({"port": server.port, "pg_port": server.pg_port}) + "\n")
    log = state_dir / PG_LOG
    try:
        server._procs["postgres"] = proc = _start_postgres(bindir, state_dir, server.pg_port)
        server.postgres_pid = proc.pid
        _wait_postgres(bindir, proc, server.pg_port, timeout_s)
        _run([str(bindir / "createdb"), "-h", HOST, "-p", str(server.pg_port), "-U", DB_ROLE, DB_NAME], "createdb",
             env=_server_env(state_dir), ok_if="already exists")
        log = state_dir / MLFLOW_LOG
        server._procs["mlflow"] = proc = _start_mlflow(server, workers)
        server.mlflow_pid = proc.pid
        (state_dir / MLFLOW_PID).write_text(f"{proc.pid}\n")
        _wait_mlflow(proc, server.tracking_uri, timeout_s)
    except MlflowServerError as exc:
        server.stop(timeout_s=5)
        raise MlflowServerError(f"{exc}; {log}:\n{_log_tail(log)}") from None
    except BaseException:
        server.stop(timeout_s=5)
        raise
    server.startup_s = time.monotonic() - t0
    return server


def stop(state_dir: Path = DEFAULT_STATE_DIR, timeout_s: float = 20.0) -> MlflowServer | None:
    """Stop what runs from `state_dir` (mlflow server, then PostgreSQL), by PID; what was running, or None."""
    server = status(state_dir)
    if server is not None:
        server.stop(timeout_s=timeout_s)
    return server


@contextlib.contextmanager
def running(state_dir: Path, port: int | None = None, pg_port: int | None = None, workers: int = 1,
            timeout_s: float = 120.0) -> Iterator[MlflowServer]:
    """`start(...)` for the duration of a with block; stopped (by PID) on leaving it."""
    server = start(state_dir, port=port, pg_port=pg_port, workers=workers, timeout_s=timeout_s)
    try:
        yield server
    finally:
        server.stop()


# ----------------------------------------------------------------------------- CLI
def _print_started(server: MlflowServer, fresh: bool) -> None:
    if fresh:
        print(f"MLflow tracking server started (pid {server.mlflow_pid}) in {server.startup_s:.1f} s, on PostgreSQL "
              f"(pid {server.postgres_pid}, {HOST}:{server.pg_port})")
    else:
        print(f"MLflow tracking server already running (pid {server.mlflow_pid})")
    print(f"  tracking URI: {server.tracking_uri}   (params: mlflow.tracking_uri, or MLFLOW_TRACKING_URI)")
    print(f"  artifacts:    {server.artifacts_dir}   (proxied: clients upload and download through the server)")
    print(f"  logs:         {server.state_dir / MLFLOW_LOG}, {server.state_dir / PG_LOG}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.mlflow_server", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("command", choices=["start", "stop", "status"])
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR,
                        help=f"cluster, artifacts, logs and PID file (default: {DEFAULT_STATE_DIR})")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="MLflow's HTTP port; 0 picks a free one")
    parser.add_argument("--pg-port", type=int, default=0, help="PostgreSQL's port (default 0: a free one)")
    parser.add_argument("--workers", type=int, default=2, help="uvicorn worker processes (default 2)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for start-up or shutdown")
    args = parser.parse_args(argv)
    try:
        if args.command == "start":
            server = status(args.state_dir)
            if server is not None and server.mlflow_pid and server.postgres_pid:
                _print_started(server, fresh=False)
                return 0
            server = start(args.state_dir, port=args.port or None, pg_port=args.pg_port or None,
                           workers=args.workers, timeout_s=args.timeout)
            _print_started(server, fresh=True)
            return 0
        if args.command == "stop":
            server = stop(args.state_dir, timeout_s=args.timeout)
            print("MLflow tracking server was not running" if server is None else
                  f"stopped mlflow server (pid {server.mlflow_pid}) and PostgreSQL (pid {server.postgres_pid})")
            return 0
        server = status(args.state_dir)
        if server is None:
            print("MLflow tracking server is not running")
            return 3  # LSB: program is not running
        def state(pid: int | None) -> str:
            return f"pid {pid}" if pid else "not running"

        print(f"mlflow server: {state(server.mlflow_pid)} ({server.tracking_uri}); "
              f"PostgreSQL: {state(server.postgres_pid)} ({HOST}:{server.pg_port})")
        return 0 if server.mlflow_pid and server.postgres_pid else 3
    except MlflowServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
