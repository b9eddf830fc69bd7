"""Resource pre-flight: refuse work that would not fit in memory before allocating it (torch-free).

A spec's parameter and activation counts come from its analytic twin
(`archc.frontend.analytic_complexity`, microseconds, no allocation; every registered block has one).
The estimate of a build's peak memory is deliberately generous:

    bytes = 24 * params + 16 * acts * batch

24 bytes per parameter: the float32 model, the float64 working copy the passes verify in, and
the float64 reference it is compared with; 16 bytes per activation element: a float64 output and
its float32 twin of every conv and linear, live at once in the worst case. The default budget is
half of the machine's physical memory (`--max-memory` changes it).
"""

from __future__ import annotations

import os

from archc.errors import ResourceError

BYTES_PER_PARAM = 24
BYTES_PER_ACT = 16
# torch indexes a tensor with int64 and sizes its storage in bytes: beyond this it overflows
LARGEST_TENSOR = 2**62


def physical_memory() -> int | None:
    """Bytes of physical memory, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def default_budget() -> int | None:
    total = physical_memory()
    return None if total is None else total // 2


def estimate_bytes(params: int, acts: int, batch: int = 1) -> int:
    return BYTES_PER_PARAM * params + BYTES_PER_ACT * acts * batch


def format_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if count < 1024 or unit == "PiB":
            return f"{count:,.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1024
    return f"{count:.3g} PiB"  # unreachable; keeps type checkers content


def preflight(spec, *, batch: int = 1, input_size: int | None = None,
              budget: int | None = None, source: str = "",
              allocates: bool = True) -> tuple[int, int]:
    """`(params, estimated bytes)` of building `spec`; raises `ResourceError` when the estimate
    exceeds `budget` (default: half of memory) or, for work that `allocates` nothing (meta
    tensors), only when sizes exceed what torch indexes."""
    from archc.frontend.analytic_complexity import spec_complexity

    _, params, acts = spec_complexity(spec, input_size=input_size)
    needed = estimate_bytes(params, acts, batch)
    budget = default_budget() if budget is None else budget
    where = f"{source}: " if source else ""
    if params > LARGEST_TENSOR // 8 and not allocates:
        raise ResourceError(f"{where}{params:,} params are more than torch can index")
    if allocates and (params > LARGEST_TENSOR or (budget is not None and needed > budget)):
        raise ResourceError(
            f"{where}the model needs about {format_bytes(needed)} ({params:,} params, {acts:,} "
            f"activations per sample x batch {batch}), more than the budget of "
            f"{format_bytes(budget or 0)}; make it smaller, or raise --max-memory")
    return params, needed
