"""Training progress with rate and time remaining: on a terminal a tqdm bar updated every
iteration (Caffe's display lines above it), elsewhere (logs, pipes) one plain line per
display interval."""
from __future__ import annotations

import time
from typing import Optional, TextIO

from tqdm import tqdm


class TrainProgress:
    """`average_loss` is the solver's window: the smoothed loss is shown only where it
    averages more than one iteration (with 1 it is the loss itself)."""

    def __init__(self, stream: TextIO, start: int, total: int, images_per_iter: Optional[int], display: int,
                 enabled: bool = True, average_loss: int = 1):
        self.stream = stream
        self.total = total
        self.images_per_iter = images_per_iter
        self.display = display
        self.enabled = enabled
        self.average_loss = average_loss
        self.is_tty = enabled and hasattr(stream, "isatty") and stream.isatty()
        self._window_start, self._window_iters = time.perf_counter(), 0
        # Time left comes from the whole run's rate: one display window's rate swings with
        # the test passes and snapshots that fall in it.
        self._run_start, self._run_iters = self._window_start, 0
        self.bar = None
        if self.is_tty and start < total:
            self.bar = tqdm(total=total, initial=start, file=stream, unit="it", dynamic_ncols=True,
                            mininterval=0, miniters=1, leave=True)

    def print(self, line: str) -> None:
        """A line of its own, above the bar where there is one."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def iteration(self, it: int, loss: float, smoothed: float, lr: float) -> None:
        """After iteration `it` (counted from 0) has updated the weights."""
        if not self.enabled:
            return
        self._window_iters += 1
        self._run_iters += 1
        now = time.perf_counter()
        per_second = self._window_iters / max(now - self._window_start, 1e-9)
        run_per_second = self._run_iters / max(now - self._run_start, 1e-9)
        mean = f" (mean of the last {self.average_loss}: {smoothed:.6g})" if self.average_loss > 1 else ""
        text = f"loss {loss:.6g}{mean} lr {lr:.6g}"
        if self.bar is not None:
            speed = f" {per_second * self.images_per_iter:.1f} img/s" if self.images_per_iter else ""
            self.bar.set_postfix_str(text + speed, refresh=False)
            self.bar.update(1)
        if self.display and it % self.display == 0:
            self.print(f"iteration {it} {text} {self._speed(per_second, run_per_second, it)}")
            self._window_start, self._window_iters = time.perf_counter(), 0

    def _speed(self, per_second: float, run_per_second: float, it: int) -> str:
        speed = (f"{per_second * self.images_per_iter:.1f} img/s" if self.images_per_iter
                 else f"{per_second:.2f} it/s")
        left = (self.total - it - 1) / run_per_second
        return f"{speed}, {tqdm.format_interval(left)} left"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
