"""A local Orthanc PACS with DICOMweb, for development and tests: started and stopped by the project.

    python -m tools.orthanc start [--state-dir .pacs] [--port 8042] [--user NAME:PASSWORD ...]
    python -m tools.orthanc status|stop [--state-dir .pacs]

The state folder (default `.pacs/` in the repository, git-ignored) holds the generated configuration
(orthanc.json), the storage and SQLite index (db/), Orthanc's log (orthanc.log) and its PID (orthanc.pid).
Our own configuration is passed to the Orthanc binary, so a system Orthanc of the Debian package (its
/etc/orthanc, its service) plays no part; it can only hold a port (8042 by default), which `start` reports.

From Python (tests): `start(state_dir, port=None, users=None)` returns an `OrthancServer` (`url`,
`dicomweb_url`, `pid`, `stop()`); `running(...)` is the same as a context manager. Only the standard
library is used here, so that the CLI runs with any Python 3.11.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_STATE_DIR = REPO / ".pacs"
DEFAULT_PORT = 8042
HOST = "127.0.0.1"
DICOMWEB_ROOT = "/dicom-web/"
DEFAULT_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
CONFIG_FILE, PID_FILE, LOG_FILE = "orthanc.json", "orthanc.pid", "orthanc.log"
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
SETUP_HINT = "run `make setup-pacs` (Debian packages orthanc, orthanc-dicomweb, dicom3tools)"


class OrthancError(RuntimeError):
    """Orthanc could not be started, reached or stopped."""


class OrthancNotInstalled(OrthancError):
    """The Orthanc binary or its DICOMweb plugin is missing."""


# ----------------------------------------------------------------------------- installation
def orthanc_binary() -> str:
    """The Orthanc executable: $ORTHANC_BIN, else `Orthanc` on PATH, else /usr/sbin/Orthanc (the Debian
    package's place, which is not on a normal user's PATH)."""
    explicit = os.environ.get("ORTHANC_BIN")
    if explicit:
        if os.access(explicit, os.X_OK) and Path(explicit).is_file():
            return explicit
        raise OrthancNotInstalled(f"ORTHANC_BIN={explicit} is not an executable file; unset it or {SETUP_HINT}")
    found = shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin:/usr/local/sbin")
    if not found:
        raise OrthancNotInstalled(f"Orthanc is not installed (no `Orthanc` on PATH or in /usr/sbin): {SETUP_HINT}")
    return found


def dicomweb_plugin() -> Path:
    """The DICOMweb plugin's shared library: $ORTHANC_DICOMWEB_PLUGIN, else the Debian package's path."""
    path = Path(os.environ.get("ORTHANC_DICOMWEB_PLUGIN") or DEFAULT_PLUGIN)
    if not path.is_file():
        raise OrthancNotInstalled(f"the Orthanc DICOMweb plugin is missing ({path}): {SETUP_HINT}")
    return path


def check_installed() -> tuple[str, Path]:
    """(Orthanc binary, DICOMweb plugin), or OrthancNotInstalled saying to run `make setup-pacs`."""
    return orthanc_binary(), dicomweb_plugin()


# ----------------------------------------------------------------------------- ports
def free_port() -> int:
    """A TCP port that is free on this machine now (the OS's pick; another process may take it later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))  # all interfaces: Orthanc 1.10 binds 0.0.0.0 (see write_config)
        return sock.getsockname()[1]


def port_in_use(port: int, host: str = HOST) -> bool:
    """Whether something accepts TCP connections on host:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((host, port)) == 0


# ----------------------------------------------------------------------------- configuration
def write_config(state_dir: Path, port: int, users: dict[str, str] | None = None, *,
                 plugin: Path | None = None) -> Path:
    """Write `state_dir`/orthanc.json for an instance on `port` and return its path.

    `users` (name -> password) turns on HTTP basic authentication. Orthanc reads the passwords from this
    file only (plain text, as Orthanc requires), so it is made readable by its owner alone; nothing here
    logs them.
    """
    state_dir = Path(state_dir).resolve()
    db, tmp = state_dir / "db", state_dir / "tmp"
    for folder in (state_dir, db, tmp):
        folder.mkdir(parents=True, exist_ok=True)
    state_dir.chmod(0o700)
    config = {
        "Name": "resdx-dev-pacs",
        "StorageDirectory": str(db),
        "IndexDirectory": str(db),
        "TemporaryDirectory": str(tmp),
        "StorageCompression": False,  # files stay byte-identical on disk (and cheaper to read back)
        "MaximumStorageSize": 0,
        "MaximumPatientCount": 0,
        # HTTP server. Orthanc 1.10 cannot be told which address to listen on: it always binds 0.0.0.0
        # (the option "HttpBindAddresses" only appeared in Orthanc 1.12.10, September 2025). The guard is
        # RemoteAccessAllowed=false: Orthanc rejects (401 in 1.10.1) any client whose address is not loopback.
        "HttpServerEnabled": True,
        "HttpPort": int(port),
        "RemoteAccessAllowed": False,
        "SslEnabled": False,
        "AuthenticationEnabled": bool(users),
        "RegisteredUsers": dict(users or {}),
        "HttpDescribeErrors": True,
        "HttpCompressionEnabled": True,
        "HttpThreadsCount": 16,
        "HttpRequestTimeout": 60,  # s, socket timeout while serving a request (a slow STOW-RS upload)
        "HttpTimeout": 30,  # s, requests Orthanc itself makes (peers, DICOMweb servers)
        "KeepAlive": True,
        # Outgoing HTTPS (DICOMweb client of the plugin, peers) checks certificates against the system's bundle.
        "HttpsVerifyPeers": True,
        "HttpsCACertificates": CA_BUNDLE if Path(CA_BUNDLE).is_file() else "",
        # No DICOM (DIMSE) server: the pipeline speaks DICOMweb only, and no port 4242 is taken (nor
        # clashes with a system Orthanc of the Debian package).
        "DicomServerEnabled": False,
        # Surface and hygiene: nothing that executes code, writes outside the state folder or
        # survives a restart without being asked for.
        "ExecuteLuaEnabled": False,
        "RestApiWriteToFileSystemEnabled": False,
        "WebDavEnabled": False,
        "LuaScripts": [],
        "SaveJobs": False,
        "ConcurrentJobs": 2,
        "DeidentifyLogs": True,  # no patient data in orthanc.log
        "OrthancExplorerEnabled": True,  # the web UI at /app/explorer.html
        "Plugins": [str(plugin or dicomweb_plugin())],
        # orthanc-dicomweb 1.7. "Host" fixes the base of the URLs it writes into its answers (RetrieveURL of
        # STOW-RS, BulkDataURI of /metadata): left out, 1.7 takes the Host header without its port
        # ("http://127.0.0.1/dicom-web/..."). Only loopback clients are served, so 127.0.0.1:PORT is right.
        # StudiesMetadata/SeriesMetadata keep their default "Full" (every tag, read from the stored files),
        # which is what a reader of /metadata wants; WADO-URI is not needed.
        "DicomWeb": {"Enable": True, "Root": DICOMWEB_ROOT, "Host": f"{HOST}:{int(port)}", "Ssl": False,
                     "EnableWado": False},
    }
    path = state_dir / CONFIG_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(config, fh, indent=2)
    path.chmod(0o600)  # O_CREAT's mode does not apply to an existing file
    return path


# ----------------------------------------------------------------------------- processes
def _proc_stat_state(pid: int) -> str | None:
    """The state letter of /proc/PID/stat (e.g. "S", "Z"), or None where there is no such process/no /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[0]


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie (a zombie has exited; only its parent may reap it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return _proc_stat_state(pid) != "Z"


def _is_orthanc(pid: int, config: Path) -> bool:
    """Whether `pid` is an Orthanc run with `config` (guards against a PID reused by another program)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except FileNotFoundError:
        return pid_alive(pid) if not Path("/proc").is_dir() else False
    except OSError:
        return False
    return str(config).encode() in argv


def _reap(pid: int) -> None:
    """Collect the exit status of `pid` if it is our child (no zombie left behind)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _terminate(pid: int, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    """SIGTERM `pid`, then SIGKILL if it is still there after `timeout_s`; wait until it has gone."""
    if proc is not None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        return
    for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            _reap(pid)
            if not pid_alive(pid):
                return
            time.sleep(0.05)
    if pid_alive(pid):
        raise OrthancError(f"Orthanc (pid {pid}) did not exit after SIGKILL")


def _log_tail(log: Path, lines: int = 40) -> str:
    try:
        text = log.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:]) or "(empty log)"


def _get(url: str, auth: tuple[str, str] | None, accept: str = "application/json") -> int:
    """The HTTP status of GET `url` (0 when nothing answers)."""
    req = urllib.request.Request(url, headers={"Accept": accept})
    if auth is not None:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(req, timeout=2.0) as resp:
            resp.read()
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError):
        return 0


# ----------------------------------------------------------------------------- the server
@dataclass
class OrthancServer:
    """A running Orthanc of ours: its state folder, port and PID."""

    state_dir: Path
    port: int
    pid: int
    startup_s: float | None = None  # seconds from launch to DICOMweb answering (None: found running)
    _proc: subprocess.Popen | None = field(default=None, repr=False, compare=False)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def dicomweb_url(self) -> str:
        return self.url + DICOMWEB_ROOT.rstrip("/")

    @property
    def explorer_url(self) -> str:
        return self.url + "/app/explorer.html"

    @property
    def config_file(self) -> Path:
        return self.state_dir / CONFIG_FILE

    @property
    def pid_file(self) -> Path:
        return self.state_dir / PID_FILE

    @property
    def log_file(self) -> Path:
        return self.state_dir / LOG_FILE

    def is_running(self) -> bool:
        if self._proc is not None:
            return self._proc.poll() is None
        return pid_alive(self.pid) and _is_orthanc(self.pid, self.config_file)

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM (then SIGKILL after `timeout_s`) the process, wait for it, remove the PID file."""
        if self.is_running():
            _terminate(self.pid, timeout_s, self._proc)
        _reap(self.pid)
        with contextlib.suppress(FileNotFoundError):
            if self.pid_file.read_text().strip() == str(self.pid):
                self.pid_file.unlink()

    def __enter__(self) -> OrthancServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def status(state_dir: Path = DEFAULT_STATE_DIR) -> OrthancServer | None:
    """The Orthanc running from `state_dir` (per its PID file and configuration), or None.
    A stale PID file (the process has gone, or the PID now belongs to another program) is removed."""
    state_dir = Path(state_dir).resolve()
    pid_file, config = state_dir / PID_FILE, state_dir / CONFIG_FILE
    try:
        pid = int(pid_file.read_text().strip())
        port = int(json.loads(config.read_text())["HttpPort"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if pid_alive(pid) and _is_orthanc(pid, config):
        return OrthancServer(state_dir=state_dir, port=port, pid=pid)
    with contextlib.suppress(FileNotFoundError):
        pid_file.unlink()
    return None


def _launch(binary: str, config: Path, state_dir: Path) -> subprocess.Popen:
    with (state_dir / LOG_FILE).open("ab") as log:
        # Own session (and process group): a Ctrl-C in the shell that ran `make pacs` does not reach it,
        # and it outlives the CLI that started it.
        return subprocess.Popen([binary, str(config)], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                cwd=state_dir, start_new_session=True, close_fds=True)


def _wait_ready(proc: subprocess.Popen, port: int, auth: tuple[str, str] | None, timeout_s: float) -> bool:
    """Wait until /system and /dicom-web/studies answer 200; False if the process exits first."""
    base = f"http://{HOST}:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if (_get(base + "/system", auth) == 200
                and _get(base + DICOMWEB_ROOT + "studies", auth, accept="application/dicom+json") == 200):
            return True
        time.sleep(0.05)
    raise TimeoutError


def start(state_dir: Path = DEFAULT_STATE_DIR, port: int | None = None, users: dict[str, str] | None = None,
          timeout_s: float = 30.0) -> OrthancServer:
    """Start Orthanc (with the DICOMweb plugin) from `state_dir` and wait until DICOMweb answers.

    `port` None picks a free port (retried if another process takes it first). `users` (name -> password)
    turns on basic authentication. Raises OrthancNotInstalled if Orthanc or the plugin is missing, and
    OrthancError if an instance already runs from `state_dir`, the port is taken, or Orthanc does not come up
    within `timeout_s` (with the tail of its log).
    """
    binary, plugin = check_installed()
    state_dir = Path(state_dir).resolve()
    running_now = status(state_dir)
    if running_now is not None:
        raise OrthancError(f"Orthanc already runs from {state_dir} (pid {running_now.pid}, {running_now.url}); "
                           "stop it first")
    if port is not None and port_in_use(port):
        hint = " (the Debian package's system Orthanc listens there: `service orthanc stop`)" if port == 8042 else ""
        raise OrthancError(f"port {port} is already in use{hint}; choose another one (--port, make pacs PACS_PORT=...)")
    auth = next(iter(users.items())) if users else None
    attempts = 3 if port is None else 1
    for attempt in range(attempts):
        chosen = free_port() if port is None else port
        config = write_config(state_dir, chosen, users, plugin=plugin)
        log = state_dir / LOG_FILE
        log_start = log.stat().st_size if log.exists() else 0
        t0 = time.monotonic()
        proc = _launch(binary, config, state_dir)
        (state_dir / PID_FILE).write_text(f"{proc.pid}\n")
        server = OrthancServer(state_dir=state_dir, port=chosen, pid=proc.pid, _proc=proc)
        try:
            ready = _wait_ready(proc, chosen, auth, timeout_s)
        except TimeoutError:
            server.stop(timeout_s=5)
            raise OrthancError(f"Orthanc did not answer on {server.url} within {timeout_s:g} s; "
                               f"{log}:\n{_log_tail(log)}") from None
        except BaseException:
            server.stop(timeout_s=5)
            raise
        if ready:
            server.startup_s = time.monotonic() - t0
            return server
        server.stop(timeout_s=5)
        new_log = log.read_bytes()[log_start:].decode(errors="replace")
        if attempt + 1 < attempts and "port of the HTTP server is privileged or already in use" in new_log:
            continue  # the free port was taken meanwhile (Orthanc error 2003, HttpPortInUse): pick another
        raise OrthancError(f"Orthanc exited with status {proc.returncode} during start-up; {log}:\n{_log_tail(log)}")
    raise AssertionError("unreachable")


def stop(state_dir: Path = DEFAULT_STATE_DIR, timeout_s: float = 10.0) -> int | None:
    """Stop the Orthanc running from `state_dir` (by its PID file); its PID, or None if none was running."""
    server = status(state_dir)
    if server is None:
        return None
    server.stop(timeout_s=timeout_s)
    return server.pid


@contextlib.contextmanager
def running(state_dir: Path, port: int | None = None, users: dict[str, str] | None = None,
            timeout_s: float = 30.0) -> Iterator[OrthancServer]:
    """`start(...)` for the duration of a with block; stopped (by PID) on leaving it."""
    server = start(state_dir, port=port, users=users, timeout_s=timeout_s)
    try:
        yield server
    finally:
        server.stop()


# ----------------------------------------------------------------------------- CLI
def _user(text: str) -> tuple[str, str]:
    name, sep, password = text.partition(":")
    if not sep or not name or not password:
        raise argparse.ArgumentTypeError("expected NAME:PASSWORD")
    return name, password


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.orthanc", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("command", choices=["start", "stop", "status"])
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR,
                        help=f"configuration, storage, log and PID file (default: {DEFAULT_STATE_DIR})")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="HTTP port; 0 picks a free one (default 8042)")
    parser.add_argument("--user", type=_user, action="append", default=[], metavar="NAME:PASSWORD",
                        help="enable basic authentication with this user (repeatable)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for start-up or shutdown")
    args = parser.parse_args(argv)
    try:
        if args.command == "start":
            server = status(args.state_dir)
            if server is not None:
                print(f"Orthanc already running (pid {server.pid})")
            else:
                server = start(args.state_dir, port=args.port or None, users=dict(args.user) or None,
                               timeout_s=args.timeout)
                print(f"Orthanc started (pid {server.pid}) in {server.startup_s:.2f} s; log: {server.log_file}")
            print(f"  web UI:   {server.explorer_url}")
            print(f"  DICOMweb: {server.dicomweb_url}")
            return 0
        if args.command == "stop":
            pid = stop(args.state_dir, timeout_s=args.timeout)
            print("Orthanc was not running" if pid is None else f"Orthanc stopped (pid {pid})")
            return 0
        server = status(args.state_dir)
        if server is None:
            print("Orthanc is not running")
            return 3  # LSB: program is not running
        print(f"Orthanc is running (pid {server.pid}) at {server.url}; DICOMweb: {server.dicomweb_url}")
        return 0
    except OrthancError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
