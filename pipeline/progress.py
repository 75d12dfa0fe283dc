"""Map a function over tasks in worker processes with a rich progress bar (order kept).

With a time limit, every task runs in a child process of its own that is killed when the limit
passes (a read blocked in the kernel or a decoder stuck in C cannot be interrupted any other way),
or that dies (the kernel's OOM killer, a crash in a decoder): `on_fail(task, why)` then gives the
task's result, and the other tasks go on.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing.connection import wait

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def progress_map(fn: Callable[[dict], dict], tasks: list[dict], workers: int, label: str, show: bool = True,
                 timeout_s: float | None = None, on_fail: Callable[[dict, str], dict] | None = None) -> list:
    columns = (TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("eta"), TimeRemainingColumn())
    results: list = [None] * len(tasks)
    with Progress(*columns, disable=not show, transient=False) as bar:
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


def _child(fn: Callable[[dict], dict], task: dict, conn) -> None:
    try:
        conn.send(fn(task))
    finally:
        conn.close()


def _supervised(fn, tasks: list[dict], workers: int, timeout_s: float, on_fail, advance) -> list:
    """Up to `workers` children at once, one per task; each killed after `timeout_s` seconds."""
    ctx = mp.get_context("fork")  # the task (plan, settings) is inherited, not pickled
    results: list = [None] * len(tasks)
    todo = list(range(len(tasks)))[::-1]
    running: dict = {}  # result pipe -> (task index, process, deadline)
    try:
        while todo or running:
            while todo and len(running) < max(1, workers):
                i = todo.pop()
                recv, send = ctx.Pipe(duplex=False)
                proc = ctx.Process(target=_child, args=(fn, tasks[i], send), daemon=True)
                proc.start()
                send.close()
                running[recv] = (i, proc, time.monotonic() + timeout_s)
            soonest = min(deadline for _i, _p, deadline in running.values())
            ready = wait(list(running), timeout=max(0.0, soonest - time.monotonic()))
            for conn in list(running):
                i, proc, deadline = running[conn]
                if conn in ready:
                    try:
                        results[i] = conn.recv()
                    except EOFError:  # the child died before it could answer
                        proc.join()
                        results[i] = on_fail(tasks[i], f"died (exit code {proc.exitcode})")
                elif time.monotonic() >= deadline:
                    proc.kill()
                    results[i] = on_fail(tasks[i], "timeout")
                else:
                    continue
                proc.join()
                conn.close()
                del running[conn]
                advance()
    finally:
        for _conn, (_i, proc, _d) in running.items():
            proc.kill()
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
            self.p.update(self.e, advance=1, info=f"epoch {epoch}: train loss {row['train_loss']:.4f}, "
                          f"val AUROC {row['val_auroc']:.3f} (best {best:.3f})")
            self.p.reset(self.s)

    def close(self) -> None:
        if self.show:
            self.p.stop()
