"""Map a function over tasks in worker processes with a rich progress bar (order kept).

With a time limit, tasks run in supervised child processes: a child whose task passes the limit is
killed (a read blocked in the kernel or a decoder stuck in C cannot be interrupted any other way) and
replaced, and a child that dies (the kernel's OOM killer, a crash in a decoder) is replaced too:
`on_fail(task, why)` then gives that task's result, and the other tasks go on.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing.connection import wait

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def task_bar(label: str, show: bool) -> Progress:
    """The bar of a map over tasks (this pool's and the Ray engine's): count, elapsed time, ETA."""
    columns = (TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("eta"), TimeRemainingColumn())
    return Progress(*columns, disable=not show, transient=False)


def progress_map(fn: Callable[[dict], dict], tasks: list[dict], workers: int, label: str, show: bool = True,
                 timeout_s: float | None = None, on_fail: Callable[[dict, str], dict] | None = None) -> list:
    results: list = [None] * len(tasks)
    with task_bar(label, show) as bar:
        job = bar.add_task(label, total=len(tasks))
        if timeout_s is not None and on_fail is not None and tasks:
            return _supervised(fn, tasks, workers, timeout_s, on_fail, lambda: bar.advance(job))
        if workers <= 1 or len(tasks) <= 1:
            for i, t in enumerate(tasks):
                results[i] = fn(t)
                bar.advance(job)
            return results
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = {pool.submit(fn, t): i for i, t in enumerate(tasks)}
            for fut in as_completed(futures):
                results[futures[fut]] = fut.result()
                bar.advance(job)
    return results


TASKS_PER_WORKER = 64  # a worker is replaced after this many tasks: its memory stays that of recent cases


def _worker(fn: Callable[[dict], dict], tasks: list[dict], conn) -> None:
    """Run the tasks whose indices arrive on `conn`, answering (index, result), until None arrives.

    The tasks are inherited through fork, so only indices cross the pipe. An exception in `fn` ends the
    worker (the parent reports the task as died), as a crash in a decoder would."""
    try:
        while (i := conn.recv()) is not None:
            conn.send((i, fn(tasks[i])))
    except EOFError:  # the parent went away
        pass
    finally:
        conn.close()


def _supervised(fn, tasks: list[dict], workers: int, timeout_s: float, on_fail, advance) -> list:
    """Up to `workers` long-lived children; a task that passes `timeout_s` has its child killed and replaced.

    Long-lived, not one child per task: a fork of a parent that has imported torch costs about 30 ms a case
    (the demo's 312 cases: 60.3 s with a fork per case, 41.1 s in-process, one worker; benchmarks/README.md).
    """
    ctx = mp.get_context("fork")  # the tasks (plan, settings) are inherited, not pickled
    results: list = [None] * len(tasks)
    todo = list(range(len(tasks)))[::-1]
    idle: list = []  # (process, connection, tasks done)
    busy: dict = {}  # connection -> (process, task index, deadline, tasks done)

    def start():
        parent, child = ctx.Pipe(duplex=True)
        proc = ctx.Process(target=_worker, args=(fn, tasks, child), daemon=True)
        proc.start()
        child.close()
        return proc, parent, 0

    def retire(proc, conn, kill: bool = False) -> None:
        if kill:
            proc.kill()
        else:
            try:
                conn.send(None)
            except OSError:
                pass
        proc.join(timeout=None if kill else 30)
        if proc.is_alive():
            proc.kill()
            proc.join()
        conn.close()

    try:
        while todo or busy:
            while todo and len(busy) < max(1, workers):
                proc, conn, done = idle.pop() if idle else start()
                i = todo.pop()
                conn.send(i)
                busy[conn] = (proc, i, time.monotonic() + timeout_s, done)
            soonest = min(deadline for _p, _i, deadline, _d in busy.values())
            ready = wait(list(busy), timeout=max(0.0, soonest - time.monotonic()))
            for conn in list(busy):
                proc, i, deadline, done = busy[conn]
                if conn in ready:
                    try:
                        _j, results[i] = conn.recv()
                    except EOFError:  # the child died before it could answer
                        proc.join()
                        results[i] = on_fail(tasks[i], f"died (exit code {proc.exitcode})")
                        retire(proc, conn, kill=True)
                    else:
                        if done + 1 >= TASKS_PER_WORKER:
                            retire(proc, conn)
                        else:
                            idle.append((proc, conn, done + 1))
                elif time.monotonic() >= deadline:
                    retire(proc, conn, kill=True)
                    results[i] = on_fail(tasks[i], "timeout")
                else:
                    continue
                del busy[conn]
                advance()
    finally:
        for proc, _i, _d, _n in busy.values():
            proc.kill()
        for proc, conn, _n in idle:
            retire(proc, conn)
    return results


class EpochBar:
    """Rich progress for training: one bar over epochs (with ETA), one over the current epoch's steps."""

    def __init__(self, show: bool, epochs: int, steps: int, label: str = "epochs"):
        self.show = show
        if not show:
            return
        self.p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("eta"),
                          TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
        self.p.start()
        self.e = self.p.add_task(label, total=epochs, info="")
        self.s = self.p.add_task("steps", total=steps, info="")

    def step(self) -> None:
        if self.show:
            self.p.update(self.s, advance=1)

    def epoch_done(self, epoch: int, row: dict, best: float) -> None:
        if self.show:
            val = "not validated" if math.isnan(row["val_auroc"]) else f"{row['val_auroc']:.3f}"
            self.p.update(self.e, advance=1, info=f"epoch {epoch}: train loss {row['train_loss']:.4f}, "
                          f"val AUROC {val} (best {best:.3f})")
            self.p.reset(self.s)

    def close(self) -> None:
        if self.show:
            self.p.stop()
