"""Interleaved timing (archc/common/timing.py): warm-up runs first, then rounds in which every
configuration runs `iters` times; each keeps its round medians, measured by the clock given."""

from __future__ import annotations

from archc.common.timing import interleaved


def test_interleaved_takes_turns_and_keeps_round_medians_of_the_given_clock():
    now = [0.0]
    calls: list[str] = []

    def run(name: str, costs):
        def step():
            calls.append(name)
            now[0] += next(costs)
        return step

    # a costs 2 every call; b's cost grows by one each call (its first call is the warm-up)
    timings = interleaved({"a": run("a", iter([2.0] * 7)), "b": run("b", iter(range(1, 8)))},
                          rounds=2, iters=3, warmup=1, clock=lambda: now[0])
    assert calls == ["a", "b", *"aaa", *"bbb", *"aaa", *"bbb"]
    assert timings["a"].rounds == [2.0, 2.0]
    assert timings["b"].rounds == [3.0, 6.0]  # medians of calls 2-4 and of calls 5-7
    assert timings["b"].median == 4.5
