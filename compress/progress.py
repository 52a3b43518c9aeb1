"""Progress for long work: live rich bars on a terminal, one log line per finished task elsewhere (CI logs)."""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class RunProgress:
    def __init__(self, console: Console | None = None, quiet: bool = False) -> None:
        self.console = console or Console(stderr=True, log_path=False)
        if not self.console.is_terminal:
            # logs and CI: wide enough that the summary table is not squeezed into 80 columns
            self.console.width = max(self.console.width, 160)
        self.quiet = quiet
        self.live = self.console.is_terminal and not quiet
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TaskProgressColumn(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[status]}"),
            console=self.console,
            disable=not self.live,
        )

    def __enter__(self) -> RunProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    @contextmanager
    def task(self, description: str, total: int) -> Iterator[Callable[..., None]]:
        """Yields `advance(n=1, status='')`; the status text (loss, metric) is shown beside the bar."""
        task_id = self._progress.add_task(description, total=total, status="")
        started = time.perf_counter()
        last_status = ""

        def advance(n: int = 1, status: str | None = None) -> None:
            nonlocal last_status
            if status is not None:
                last_status = status
            self._progress.update(task_id, advance=n, status=last_status)

        try:
            yield advance
        finally:
            self._progress.update(task_id, visible=self.live)
            if not self.live and not self.quiet:
                seconds = time.perf_counter() - started
                self.console.log(f"{description}: {seconds:.1f}s {last_status}".rstrip())

    def log(self, message: str) -> None:
        if not self.quiet:
            self.console.log(message)
