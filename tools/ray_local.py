"""A real Ray cluster on this machine, for the tests and benchmarks: a head and worker nodes from `ray start`.

    with ray_cluster(nodes=2, cpus_per_node=1) as cluster:   # cluster.address -> ingest.ray_address
        ...

Every node runs in its own process group (the `ray start` process's PID); `stop()` kills those groups and
the worker processes their raylets forked (Ray gives each worker its own group), found by PPID in /proc,
so nothing outlives the caller and no other Ray on the machine is touched (`ray stop` would stop them all).
Ports are free ports of this machine, so two clusters can run side by side. Ray registers its nodes under
the machine's own address even with --node-ip-address 127.0.0.1 (by design: ray-project/ray#26293); all of
them run here. On a real cluster a user runs `ray start` by hand (README "Scaling out").
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_DISABLE_DOCKER_CPU_WARNING": "1"}
NODE_OBJECT_STORE = 80 * 1024 * 1024  # bytes; ingest's results are small dicts (the volumes stay on disk)


@dataclass
class RayCluster:
    address: str  # host:port of the head's GCS, what ingest.ray_address takes
    temp_dir: Path
    groups: list[int] = field(default_factory=list)  # the process group of each node's `ray start`

    def processes(self) -> list[tuple[int, int, str]]:
        """(pid, pgid, cmdline) of every live process of this cluster: the nodes' groups and their children."""
        table = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            table.append((int(entry.name), int(fields[1]), int(fields[2]), cmd))  # pid, ppid, pgid, cmd
        mine = {pid for pid, _pp, pgid, _c in table if pgid in self.groups}
        grew = True
        while grew:  # workers: children of a raylet, in a group of their own
            new = {pid for pid, ppid, _g, _c in table if ppid in mine} - mine
            mine |= new
            grew = bool(new)
        return [(pid, pgid, cmd) for pid, _pp, pgid, cmd in table if pid in mine]

    def workers(self, title: str) -> list[int]:
        """PIDs of the worker processes now running a task titled `title` (Ray sets `ray::<function>`)."""
        return [pid for pid, _g, cmd in self.processes() if cmd.startswith(f"ray::{title}")]

    def stop(self) -> None:
        procs = self.processes()
        for sig, wait_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            for pid, _g, _c in procs:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid, _g, _c in procs):
                time.sleep(0.2)
            procs = [p for p in procs if Path(f"/proc/{p[0]}").exists()]
            if not procs:
                break
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _start_node(exe: str, args: list[str], log: Path) -> int:
    env = dict(os.environ, **RAY_ENV)
    with log.open("w") as fh:
        proc = subprocess.Popen([exe, "start", *args], env=env, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
        rc = proc.wait(timeout=120)
    assert rc == 0, f"ray start {' '.join(args[:2])} failed:\n{log.read_text()[-3000:]}"
    return proc.pid


@contextlib.contextmanager
def ray_cluster(nodes: int = 2, cpus_per_node: int = 1, log_dir: Path | None = None,
                exe: str | None = None) -> Iterator[RayCluster]:
    """A head node and `nodes - 1` worker nodes on this machine, each with `cpus_per_node` CPUs and ports
    of its own (free ports: two test processes may each run a cluster). `exe`: the `ray` command (default:
    the one beside this Python)."""
    exe = exe or str(Path(sys.executable).with_name("ray"))
    # Short: Ray's Unix sockets live under it, and a socket path has at most 107 bytes.
    temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    logs = Path(log_dir or temp)
    port = free_port()
    cluster = RayCluster(address=f"127.0.0.1:{port}", temp_dir=temp)
    common = ["--num-cpus", str(cpus_per_node), "--object-store-memory", str(NODE_OBJECT_STORE),
              "--disable-usage-stats", "--node-ip-address", "127.0.0.1"]
    try:
        head = ["--head", "--port", str(port), "--temp-dir", str(temp), "--include-dashboard=false",
                "--dashboard-port", str(free_port())]
        for n in range(nodes):
            own = ["--node-manager-port", str(free_port()), "--object-manager-port", str(free_port()),
                   "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
                   "--runtime-env-agent-port", str(free_port()), "--metrics-export-port", str(free_port())]
            args = (head if n == 0 else ["--address", cluster.address]) + own + common
            cluster.groups.append(_start_node(exe, args, logs / f"ray-node{n}.log"))
        _wait_for_nodes(cluster, nodes)
        yield cluster
    finally:
        cluster.stop()


def _wait_for_nodes(cluster: RayCluster, nodes: int, timeout_s: float = 60) -> None:
    code = ("import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
            "print(sum(n['Alive'] for n in ray.nodes()))")
    deadline, alive = time.monotonic() + timeout_s, ""
    while time.monotonic() < deadline:
        out = subprocess.run([sys.executable, "-c", code, cluster.address], capture_output=True, text=True,
                             env=dict(os.environ, **RAY_ENV), timeout=60)
        alive = out.stdout.strip()
        if alive == str(nodes):
            return
        time.sleep(1)
    raise AssertionError(f"the Ray cluster has {alive or 'no'} live nodes of {nodes}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
