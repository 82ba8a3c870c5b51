"""Live progress for ``fedge simulate``: a progress bar and a per-round table (rich)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedge.server.loop import RoundEvent


def _bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    return str(n)  # pragma: no cover


class RichProgress:
    """A :class:`~fedge.server.loop.RoundHook` that shows rounds as they complete."""

    COLUMNS = ("round", "accuracy", "loss", "clients", "bytes up", "bytes down", "seconds")
    WIDTHS = (5, 8, 7, 7, 9, 10, 7)

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.progress = Progress(
            TextColumn("[bold]federated rounds"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.console,
            transient=True,
        )
        self._task = self.progress.add_task("rounds", total=1)
        self.rows: list[tuple[str, ...]] = []

    def on_start(self, first_round: int, num_rounds: int) -> None:
        """Start the bar at ``first_round - 1`` of ``num_rounds``."""
        self.progress.update(self._task, total=num_rounds, completed=first_round - 1)
        self.console.print(self._header())
        self.progress.start()

    def _line(self, cells: tuple[str, ...]) -> str:
        return "  ".join(f"{c:>{w}}" for c, w in zip(cells, self.WIDTHS, strict=True))

    def _header(self) -> str:
        return self._line(self.COLUMNS)

    def on_round(self, event: RoundEvent) -> None:
        """Print the round's row above the bar and advance it."""
        r = event.record
        row = (
            str(r.round),
            f"{r.accuracy:.4f}",
            f"{r.loss:.4f}",
            f"{r.clients}/{r.sampled}",
            _bytes(r.bytes_up),
            _bytes(r.bytes_down),
            f"{r.wall_s:.2f}",
        )
        self.rows.append(row)
        line = self._line(row)
        if r.privacy is not None:  # dp: the epsilon spent so far, at target-delta
            line += f"  epsilon {r.privacy['epsilon']:.3f}"
        self.progress.console.print(line, highlight=False)
        self.progress.advance(self._task)
        if self.progress.finished:
            self.progress.stop()

    def stop(self) -> None:
        """Remove the bar (call when the run ends, also on error)."""
        self.progress.stop()

    def table(self) -> Table:
        """All rounds as a rich table."""
        table = Table(*self.COLUMNS)
        for row in self.rows:
            table.add_row(*row)
        return table
