"""Sweeps: train every sample of a space, in parallel, resumably, one JSON line per model.

`run_sweep` takes samples (from `archc.space.design_space` or a samples file), drops those the
results file already holds, and runs `run_task` on each of the others: in this process
(`workers=1`), in local worker processes (`workers=N`, spawned, so no state is inherited) or as Ray
tasks (`ray=ADDRESS`), each asking Ray for `resources` (default one CPU and no GPU; a request no
node of the cluster can meet is refused before any task starts). Ray gives a task that asks for
GPUs its own (CUDA_VISIBLE_DEVICES), so a trainer's `device` `auto` finds that GPU; a task without
GPUs is handed `device` `cpu` in place of `auto`, whatever the node has. `run_task` is the same
function in all three; it fixes the intra-op thread count, so identical seeds give identical
numbers whichever way it runs. The parent
alone appends to the results file, one complete line per finished model
(`archc.space.records.Appender`), so a killed sweep leaves whole lines (at most a partial last one,
which the next run cuts off) and a rerun trains only the models that are missing.

A result line holds the sample (`id`, `space`, `index`, `spec`, `complexity`, `parameters`), the
training `setup` (data, epochs, seed, trainer, options), the trainer's metrics (`errors` per epoch,
`best_error`, `final_error`, `epochs` for the built-in trainer), and `seconds`. A model whose
training fails (the loss diverges) is recorded with `failed` and `best_error` null. A rerun refuses
a results file whose lines were trained from other specs or with another setup.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from archc.common.progress import Progress
from archc.errors import ArchcError, SpaceError, TrainingError
from archc.space.records import Appender, read_records

BUILTIN_TRAINER = "archc.train:train_spec"
# thread pools of worker processes (OpenMP, MKL, OpenBLAS): as many threads as a task uses, as Ray
# does, else each library's idle threads spin against the other workers' on the same cores
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
RAY_DEFAULTS = {"num_cpus": 1, "num_gpus": 0}  # what a Ray task asks for unless told


def resolve_trainer(reference: str) -> Callable[..., dict[str, Any]]:
    """The callable named `module:function` (the current directory is importable)."""
    module_name, sep, function_name = reference.partition(":")
    if not sep or not module_name or not function_name:
        raise ArchcError(f"--trainer {reference!r}: expected module:function")
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or the module failing while it is imported
        raise ArchcError(f"--trainer {reference}: cannot import {module_name} "
                         f"({type(exc).__name__}: {exc})") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ArchcError(f"--trainer {reference}: {module_name} has no function {function_name}")
    return function


def run_task(task: dict[str, Any]) -> dict[str, Any]:
    """Train one sample; return its result line (module docstring). Picklable, stateless. The
    trainer gets the setup's options, with `device` replaced by the task's `device` if it has
    one (a Ray task's, `ray_task`); the line records the setup as given."""
    sample, setup = task["sample"], task["setup"]
    options = dict(setup["options"], **({"device": task["device"]} if "device" in task else {}))
    trainer = resolve_trainer(setup["trainer"])
    start = time.time()
    record = {key: sample[key] for key in ("id", "space", "index", "spec", "complexity",
                                           "parameters") if key in sample}
    record["setup"] = setup
    try:
        metrics = trainer(sample["spec"], data=setup["data"], epochs=setup["epochs"],
                          seed=setup["seed"], config=options)
    except TrainingError as exc:
        record.update(failed=str(exc), best_error=None, seconds=time.time() - start)
        return record
    except ArchcError:
        raise
    except Exception as exc:
        if setup["trainer"] == BUILTIN_TRAINER:
            raise
        raise TrainingError(f"trainer {setup['trainer']} failed on {sample['id']}: "
                            f"{type(exc).__name__}: {exc}") from None
    if not isinstance(metrics, dict) or not isinstance(metrics.get("best_error"), (int, float)):
        raise TrainingError(f"trainer {setup['trainer']} returned no best_error for "
                            f"{sample['id']} (it must return a mapping with a number best_error)")
    record.update(_finite(metrics))
    record["seconds"] = time.time() - start
    return record


def _finite(value: Any) -> Any:
    """`value` with non-finite floats as None (JSON has no NaN)."""
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def pending(samples: list[dict[str, Any]], results_path: Path,
            setup: dict[str, Any]) -> tuple[list[dict[str, Any]], int]:
    """(samples without a result yet, results already there); `SpaceError` if the results file
    was written for other specs or another setup."""
    if not results_path.exists():
        return samples, 0
    results, _ = read_records(results_path, "results")
    by_id = {sample["id"]: sample for sample in samples}
    done = set()
    for number, result in enumerate(results, start=1):
        sample = by_id.get(result.get("id"))
        where = f"line {number}"
        if sample is None:
            continue
        if result.get("spec") != sample["spec"]:
            raise SpaceError(f"{result['id']} was trained from another spec than the one sampled "
                             f"now: write the results of this sweep to another file", where,
                             str(results_path))
        if result.get("setup") != setup:
            raise SpaceError(f"{result['id']} was trained with setup {result.get('setup')}, this "
                             f"run asks for {setup}: write to another file", where,
                             str(results_path))
        done.add(result["id"])
    return [sample for sample in samples if sample["id"] not in done], len(done)


def run_sweep(samples: list[dict[str, Any]], results_path: Path, setup: dict[str, Any], *,
              workers: int = 1, ray_address: str | None = None,
              resources: dict[str, float] | None = None, quiet: bool = False,
              progress: bool = True) -> dict[str, Any]:
    """Train the pending samples; append their results. Returns counts and seconds. Says on
    stderr what is already done (unless `quiet`) and the progress (if `progress`). `resources`
    (`num_cpus`, `num_gpus`) is what each Ray task asks for."""
    todo, already = pending(samples, results_path, setup)
    total = len(samples)
    if not quiet:
        print(f"sweep: {already} of {total} models already in {results_path}, training "
              f"{len(todo)}", file=sys.stderr)
    bar = Progress(len(todo), "sweep", every=1 / max(len(todo), 1), enabled=progress)
    start, finished, failed = time.time(), 0, 0
    with Appender(results_path) as appender:
        for result in _execute(todo, setup, workers, ray_address, resources):
            appender.append(result)
            finished += 1
            failed += "failed" in result
            note = (f"{result['id']} failed: {result['failed']}" if "failed" in result else
                    f"{result['id']} best error {result['best_error']:.2f}% in "
                    f"{result['seconds']:.1f} s")
            bar.update(finished, note)
    bar.close()
    return {"trained": finished, "failed": failed, "already": already, "total": total,
            "seconds": time.time() - start}


def _execute(todo: list[dict[str, Any]], setup: dict[str, Any], workers: int,
             ray_address: str | None,
             resources: dict[str, float] | None) -> Iterable[dict[str, Any]]:
    tasks = [{"sample": sample, "setup": setup} for sample in todo]
    if ray_address is not None:
        yield from _execute_ray(tasks, ray_address, {**RAY_DEFAULTS, **(resources or {})})
    elif workers == 1 or len(tasks) <= 1:
        for task in tasks:
            yield run_task(task)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        context = multiprocessing.get_context("spawn")
        threads = str(setup["options"].get("threads", 1))
        with _environment(dict.fromkeys(THREAD_VARIABLES, threads)), ProcessPoolExecutor(
                max_workers=min(workers, len(tasks)), mp_context=context) as pool:
            futures = [pool.submit(run_task, task) for task in tasks]
            try:
                for future in as_completed(futures):
                    yield future.result()
            except BaseException:
                for future in futures:
                    future.cancel()
                raise


@contextlib.contextmanager
def _environment(variables: dict[str, str]):
    """Set environment variables for the processes started inside the block."""
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def ray_task(task: dict[str, Any]) -> dict[str, Any]:
    """`run_task` inside a Ray task: `device` `auto` becomes `cpu` when Ray gave the task no GPU
    (it would otherwise pick a GPU of the node that another task holds)."""
    import ray

    if task["setup"]["options"].get("device") == "auto" and not ray.get_gpu_ids():
        task = {**task, "device": "cpu"}
    return run_task(task)


def check_capacity(nodes: list[dict[str, Any]], resources: dict[str, float],
                   address: str) -> None:
    """Refuse (ArchcError) a request that no live node of `ray.nodes()` can meet: its tasks
    would wait for ever."""
    for option, name in (("num_cpus", "CPU"), ("num_gpus", "GPU")):
        wanted = resources.get(option, 0)
        largest = max((node["Resources"].get(name, 0.0) for node in nodes if node.get("Alive")),
                      default=0.0)
        if wanted > largest:
            flag = "--cpus-per-model" if name == "CPU" else "--gpus-per-model"
            raise ArchcError(f"{flag} {wanted:g}: no node of the Ray cluster ({address}) has "
                             f"{wanted:g} {name}s (the largest has {largest:g}), so no model "
                             f"could ever be scheduled")


def _execute_ray(tasks: list[dict[str, Any]], address: str,
                 resources: dict[str, float]) -> Iterable[dict[str, Any]]:
    try:
        import ray
    except ImportError:
        raise ArchcError("--ray needs Ray: pip install 'archc[ray]'") from None
    if not ray.is_initialized():
        if address == "local":
            ray.init(include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=address, log_to_driver=False)
    check_capacity(ray.nodes(), resources, address)
    remote = ray.remote(**resources)(ray_task)
    waiting = [remote.remote(task) for task in tasks]
    try:
        while waiting:
            ready, waiting = ray.wait(waiting, num_returns=1)
            try:
                yield ray.get(ready[0])
            except ray.exceptions.RayTaskError as exc:
                if isinstance(exc.cause, ArchcError):
                    raise exc.cause from None
                raise
    finally:
        for reference in waiting:  # an error or an interrupt: stop the rest
            ray.cancel(reference)
