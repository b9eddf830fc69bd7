"""Interleaved timing, the one protocol of every archc benchmark (torch-free).

Every configuration is warmed up first; then the configurations take turns in rounds: each round
runs every configuration `iters` times and keeps that round's median, so a drift of the machine
(another process, frequency scaling) hits all of them alike. The result of a configuration is the
median of its round medians, with the spread (minimum to maximum round median).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Timing:
    rounds: list[float] = field(default_factory=list)  # per-round medians, seconds

    @property
    def median(self) -> float:
        return statistics.median(self.rounds)

    def text(self) -> str:
        return (
            f"{self.median * 1e3:.2f} ms "
            f"[{min(self.rounds) * 1e3:.2f}-{max(self.rounds) * 1e3:.2f}]"
        )


def interleaved(configs: dict[str, Callable[[], object]], rounds: int, iters: int,
                warmup: int, clock: Callable[[], float] = time.perf_counter) -> dict[str, Timing]:
    """Time every callable in `configs`, interleaved round by round (module docstring), by
    `clock`: wall time by default; `time.process_time` counts the CPU time of this process only
    (for single-threaded work on a loaded machine, where other processes stretch wall time)."""
    for run in configs.values():
        for _ in range(warmup):
            run()
    timings = {name: Timing() for name in configs}
    for _ in range(rounds):
        for name, run in configs.items():
            samples = []
            for _ in range(iters):
                start = clock()
                run()
                samples.append(clock() - start)
            timings[name].rounds.append(statistics.median(samples))
    return timings
