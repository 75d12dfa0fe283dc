"""Map a function over tasks in worker processes with a rich progress bar (order kept)."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def progress_map(fn: Callable[[dict], dict], tasks: list[dict], workers: int, label: str, show: bool = True) -> list:
    columns = (TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("eta"), TimeRemainingColumn())
    results: list = [None] * len(tasks)
    with Progress(*columns, disable=not show, transient=False) as bar:
        job = bar.add_task(label, total=len(tasks))
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
