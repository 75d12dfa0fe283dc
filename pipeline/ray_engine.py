"""Map a function over tasks on a Ray cluster: `ingest.engine: ray` and `resdx predict --engine ray`.

The same contract as the local pool (`pipeline.progress.progress_map`): results in task order, the same
progress bar, a task past `timeout_s` stopped (its worker killed: `ray.cancel(force=True)`) and given
`on_fail(task, "timeout")`. A task whose worker process or node dies is run again by Ray up to
`MAX_RETRIES` times (Ray's own task retry), then given `on_fail(task, "died (...)")`: no task is lost and
none is counted twice, because a result is taken only from the one reference that finished.

Ray is an optional extra (`pip install 'resdx[ray]'`); nothing here is imported by the local engine.
Every node needs the same ResDx installed and must see the driver's working folder, inputs and caches at
the same paths (shared storage): each task changes into the driver's folder first, so the relative paths
of params.yaml (`.cache/ingest`, `data/ingested`) mean the same on every node.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable

from pipeline.errors import EngineError
from pipeline.progress import task_bar

MAX_RETRIES = 2  # Ray reruns a task whose worker or node died this many times before it counts as failed


def connect(address: str | None, cpus: int | None = None):
    """Join the cluster whose head is at `address` (host:port, or "auto"), or start a private Ray instance
    on this machine with `cpus` CPUs when `address` is None. Returns the `ray` module."""
    try:
        import ray
    except ImportError:
        raise EngineError("the Ray engine needs the 'ray' package, which is not installed here",
                          code="ray_missing") from None
    if ray.is_initialized():
        return ray
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # offline at run time: no usage reports
    try:
        ray.init(address=address, num_cpus=cpus if address is None else None, log_to_driver=False,
                 include_dashboard=False, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise EngineError(f"cannot join the Ray cluster at {address}: {str(err)[:300]}",
                          code="ray_unreachable") from None
    return ray


def cluster_cpus(ray) -> int:
    """The CPUs the cluster offers now: how many tasks run at once (one CPU each)."""
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def _run_case(fn: Callable[[dict], dict], cwd: str, task: dict) -> dict:
    """One task on a worker, in the driver's folder. (Its process is titled ray::_run_case while it runs.)"""
    if os.getcwd() != cwd:
        os.chdir(cwd)
    return fn(task)


def ray_map(fn: Callable[[dict], dict], tasks: list[dict], address: str | None, label: str, show: bool = True,
            timeout_s: float | None = None, on_fail: Callable[[dict, str], dict] | None = None,
            cpus: int | None = None) -> list:
    """`[fn(t) for t in tasks]`, one Ray task per item (each one CPU), at most the cluster's CPUs in flight:
    a queued task is not yet running, so its time limit starts when it is submitted into a free CPU."""
    ray = connect(address, cpus)
    from ray.exceptions import RayError

    # SPREAD: Ray's default policy keeps tasks on the driver's node while it can and spills the rest over;
    # with exactly the cluster's CPUs in flight that left the second node idle a third of the time
    # (100 CPU-bound 0.1 s tasks on 2 one-CPU nodes: 6.9 s default, 5.3 s SPREAD, 5.0 s ideal).
    remote = ray.remote(num_cpus=1, max_retries=MAX_RETRIES, retry_exceptions=False,
                        scheduling_strategy="SPREAD")(_run_case)
    window, cwd = cluster_cpus(ray), os.getcwd()
    results: list = [None] * len(tasks)
    todo = list(range(len(tasks)))[::-1]
    inflight: dict = {}  # object ref -> (task index, deadline)

    def fail(i: int, why: str, err: BaseException | None = None):
        if on_fail is None:
            raise EngineError(f"task {i} of {label}: {why}", code="ray_task_failed") from err
        return on_fail(tasks[i], why)

    with task_bar(label, show) as bar:
        job = bar.add_task(label, total=len(tasks))
        while todo or inflight:
            while todo and len(inflight) < window:
                i = todo.pop()
                deadline = time.monotonic() + timeout_s if timeout_s else math.inf
                inflight[remote.remote(fn, cwd, tasks[i])] = (i, deadline)
            soonest = min(d for _i, d in inflight.values())
            wait_s = None if soonest == math.inf else max(0.0, soonest - time.monotonic())
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=wait_s)
            if ready:  # and every other that has finished meanwhile
                ready, _ = ray.wait(list(inflight), num_returns=len(inflight), timeout=0)
            for ref in ready:
                i, _d = inflight.pop(ref)
                try:
                    results[i] = ray.get(ref)
                except RayError as err:  # the worker or its node died MAX_RETRIES + 1 times
                    results[i] = fail(i, f"died ({type(err).__name__}, after {MAX_RETRIES} retries)", err)
                bar.advance(job)
            now = time.monotonic()
            for ref, (i, deadline) in list(inflight.items()):
                if now >= deadline:
                    ray.cancel(ref, force=True)  # kills the worker process, as the local pool does
                    del inflight[ref]
                    results[i] = fail(i, "timeout")
                    bar.advance(job)
    return results


class _Worker:
    """A Ray actor holding `make()`'s result (a loaded model) for every item it is given."""

    def __init__(self, make: Callable[[], object], cwd: str):
        os.chdir(cwd)
        self.state = make()

    def run(self, fn: Callable, item) -> tuple[int, object]:
        return os.getpid(), fn(self.state, item)


def ray_actor_map(make: Callable[[], object], fn: Callable, items: list, address: str | None, label: str,
                  show: bool = True, workers: int | None = None) -> tuple[list, int]:
    """`[fn(state, item) for item in items]` over one Ray actor per cluster CPU (or `workers`), each with its
    own `state = make()`, made once: a model is loaded once per worker, not once per item. Returns the results
    in order and how many worker processes gave them.
    An actor whose process dies is restarted (and its item rerun) up to MAX_RETRIES times."""
    ray = connect(address, workers)
    from ray.util import ActorPool

    n = max(1, min(len(items), workers or cluster_cpus(ray)))
    actor = ray.remote(num_cpus=1, max_restarts=MAX_RETRIES, max_task_retries=MAX_RETRIES,
                       scheduling_strategy="SPREAD")(_Worker)  # one per CPU, over every node
    pool = ActorPool([actor.remote(make, os.getcwd()) for _ in range(n)])
    results, pids = [], set()
    with task_bar(label, show) as bar:
        job = bar.add_task(label, total=len(items))
        for pid, result in pool.map(lambda a, item: a.run.remote(fn, item), items):
            pids.add(pid)
            results.append(result)
            bar.advance(job)
    return results, len(pids)


__all__ = ["ray_map", "ray_actor_map", "connect", "cluster_cpus", "MAX_RETRIES"]
