"""The one training loop: `archc train`, sweeps, and every later command that fine-tunes a model.

Plain, seeded PyTorch on the CPU:
- SGD with momentum (Nesterov by default) and weight decay on every parameter (as pycls);
- learning rate per step t of T: linear warm-up over the first `warmup_epochs`, then cosine,
  lr_t = lr * (1 + cos(pi * t' / T')) / 2 over the remaining steps;
- loss = task_weight * cross_entropy(logits, y, label_smoothing) + the plugins' loss terms;
- optional EMA of the weights, w_ema <- decay * w_ema + (1 - decay) * w after every step (buffers
  such as BN statistics copied), evaluated beside the raw model;
- after every epoch the validation error (top-1, percent) on the held-out split
  (`archc.train.data`).

Extension points (used by quantization-aware training, pruning, slimming and distillation):
- `Plugin.wrap(model)` replaces the model before training (a fake-quantization wrapper, say);
  plugins wrap in order;
- `Plugin.loss(step)` returns an extra loss term or None, given a `Step` (model, inputs, targets,
  logits, epoch, global step): an L1 penalty on BN scales, or a teacher's soft-label distillation
  loss, which computes the teacher's logits from `step.inputs`;
- `Plugin.epoch_start(trainer, epoch)` / `epoch_end(trainer, epoch, metrics)`: schedules such as
  freezing BN statistics or observers after some epoch; `trainer.model` is the model in training;
- `TrainConfig.freeze`: fnmatch patterns of parameter names that are not trained (no gradient,
  not in the optimizer); a BatchNorm whose weight and bias are both frozen also keeps its running
  statistics (it runs in eval mode).

Devices and precision (`archc.train.device`): the model and every batch move to
`TrainConfig.device` (the same code on the CPU, CUDA and MPS), the forward pass and the loss run
under `torch.autocast` for `precision` bf16 or fp16 (fp16 with a gradient scaler), and the trained
model comes back on the CPU. Validation runs in float32.

Long runs: `Trainer(save_every=N, state_path=P, identity=...)` writes the run state
(`archc.train.state`) atomically every N epochs and after the last; `fit(..., resume=state)`
continues from one, giving the uninterrupted run's weights exactly on the CPU. `metrics_jsonl`
rewrites a JSON-lines file with one line per finished epoch (epoch, losses, errors, images/s,
seconds). Progress shows the loss, images/s and the run's ETA.

Several processes (`Trainer(ranks=...)`, `archc.train.distributed`): the model runs in
DistributedDataParallel, every process takes its piece of each global batch, its cross-entropy
weighted by its share of the batch, and the metrics are summed over the processes; rank 0 alone
writes and shows progress.

Data: any object with `train_size`, `train_batches(batch_size, seed, epoch)` and
`val_batches(batch_size)` (`archc.train.data`: arrays in memory, or an image folder streamed by a
DataLoader); for several processes, both also take `rank` and `ranks`.

Reproducibility: the batch order comes from numpy's PCG64(SeedSequence([seed, epoch])) and the
weights from `archc.ir.init`, torch's generator is seeded for dropout, deterministic algorithms are
requested (warning, not failing, for an op that has none on the device), and the intra-op thread
count is fixed (`threads`, default 1). The same seed, data, torch version, thread count and memory
format (`channels_last`, on by default: oneDNN's NHWC kernels train the small grouped convs of these
models about twice as fast on this CPU) then give the same numbers; a different thread count, memory
format or torch build may change the last bits of the reductions, and so the trajectory. On a GPU,
deterministic mode makes cuDNN choose deterministic convolution algorithms, but some CUDA kernels
have no deterministic version (the backward of adaptive average pooling, NLL loss: atomic adds) and
stay run-to-run variable; docs/design-spaces.md says what follows.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import math
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from archc.common.fileio import atomic_output
from archc.common.progress import Progress
from archc.errors import DataError, TrainingError
from archc.train.data import Dataset, ImageFolder
from archc.train.device import (
    autocast,
    check_precision,
    deterministic_algorithms,
    grad_scaler,
    resolve_device,
    to_device,
)
from archc.train.distributed import Ranks, all_sum, broadcast_buffers, check_batches, wrap
from archc.train.state import random_states, restore_random_states, save_run_state


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    batch_size: int = 64
    lr: float = 0.1  # peak learning rate
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    warmup_epochs: float = 0.0  # linear warm-up from 0 (may be fractional)
    label_smoothing: float = 0.0
    ema_decay: float | None = None  # e.g. 0.999; None: no EMA
    task_weight: float = 1.0  # weight of the cross-entropy term
    freeze: tuple[str, ...] = ()  # fnmatch patterns of parameter names kept fixed
    seed: int = 0
    threads: int = 1  # torch intra-op threads while training
    channels_last: bool = True  # NHWC while training: oneDNN's fast CPU kernels (~2x here)
    device: str = "cpu"  # auto, cpu, cuda, cuda:N or mps (archc.train.device.resolve_device)
    precision: str = "fp32"  # fp32, bf16 or fp16 autocast (fp16 with a gradient scaler)

    def describe(self) -> dict[str, Any]:
        return {key: list(value) if isinstance(value, tuple) else value
                for key, value in asdict(self).items()}


@dataclass
class Step:
    """What a loss term sees at each training step."""

    model: nn.Module
    inputs: Tensor
    targets: Tensor
    logits: Tensor
    epoch: int  # 1-based
    step: int  # global step, 0-based


class Plugin:
    """Base class of training extensions; override what you need (module docstring)."""

    def wrap(self, model: nn.Module) -> nn.Module:
        return model

    def loss(self, step: Step) -> Tensor | None:
        return None

    def epoch_start(self, trainer: Trainer, epoch: int) -> None:
        pass

    def epoch_end(self, trainer: Trainer, epoch: int, metrics: dict[str, Any]) -> None:
        pass


@dataclass
class TrainResult:
    model: nn.Module  # the model to keep: the EMA model when EMA is on
    history: list[dict[str, Any]] = field(default_factory=list)  # one entry per epoch
    seconds: float = 0.0

    @property
    def errors(self) -> list[float]:
        """Validation error per epoch of the kept model (percent)."""
        ema = bool(self.history) and "ema_val_error" in self.history[0]
        return [epoch["ema_val_error" if ema else "val_error"] for epoch in self.history]

    def metrics(self) -> dict[str, Any]:
        errors = self.errors
        best = int(np.argmin(errors))
        return {"epochs": self.history, "errors": errors, "best_error": errors[best],
                "best_epoch": best + 1, "final_error": errors[-1], "seconds": self.seconds}


class Trainer:
    """`save_every` > 0 writes the run state to `state_path` every that many epochs and after the
    last, recording `identity` (what `--resume` checks); `metrics_jsonl` gets one line per epoch.
    `ranks` places this process among several training one model (`archc.train.distributed`,
    whose process group must be up); only rank 0 writes and shows progress. `warn` receives
    one-line warnings about the configuration (a `--freeze` pattern that matches nothing, an EMA
    slower than the run)."""

    def __init__(self, config: TrainConfig, plugins: Sequence[Plugin] = (),
                 progress: bool = True, label: str = "training", save_every: int = 0,
                 state_path: Path | None = None, identity: dict[str, Any] | None = None,
                 metrics_jsonl: Path | None = None, ranks: Ranks | None = None,
                 warn: Callable[[str], None] = warnings.warn):
        if save_every < 0 or (save_every and state_path is None):
            raise TrainingError("save_every must be >= 0, with a state path when positive")
        self.config, self.plugins = config, list(plugins)
        self.ranks, self.warn = ranks, warn
        main = ranks is None or ranks.main
        self.progress, self.label = progress and main, label
        self.save_every, self.state_path = (save_every, state_path) if main else (0, None)
        self.identity = identity if identity is not None else {"config": config.describe()}
        self.metrics_jsonl = metrics_jsonl if main else None
        self.model: nn.Module | None = None

    def fit(self, model: nn.Module, data: Dataset | ImageFolder,
            resume: dict[str, Any] | None = None) -> TrainResult:
        """Train `model` on `data`, from the start or from a run state (`archc.train.state`)."""
        config = self.config
        if config.epochs < 1 or config.batch_size < 1:
            raise TrainingError("epochs and batch size must be positive")
        check_precision(config.precision)
        device = resolve_device(config.device)
        threads = torch.get_num_threads()
        torch.set_num_threads(config.threads)
        try:
            with deterministic_algorithms():
                return self._fit(model, data, device, resume)
        finally:
            torch.set_num_threads(threads)

    def _fit(self, model: nn.Module, data: Dataset | ImageFolder, device: torch.device,
             resume: dict[str, Any] | None) -> TrainResult:
        config, start = self.config, time.time()
        torch.manual_seed(config.seed)
        model = model.to(device)
        if config.channels_last:
            model = model.to(memory_format=torch.channels_last)
        for plugin in self.plugins:
            model = plugin.wrap(model)
        model = model.to(device)  # parameters a plugin added
        self.model = model
        frozen_bns, unmatched = _freeze(model, config.freeze)
        for pattern in unmatched:
            self.warn(f"--freeze {pattern!r} matches no parameter of the model (names look "
                      f"like {next(name for name, _ in model.named_parameters())!r})")
        trainable = [p for p in model.parameters() if p.requires_grad]
        if not trainable:
            raise TrainingError("every parameter is frozen: nothing to train")
        rank, ranks = (0, 1) if self.ranks is None else (self.ranks.rank, self.ranks.size)
        if ranks > 1:
            check_batches(data.train_size, config.batch_size, ranks)
        optimizer = torch.optim.SGD(trainable, lr=config.lr, momentum=config.momentum,
                                    nesterov=config.nesterov and config.momentum > 0,
                                    weight_decay=config.weight_decay)
        ema = _ema_copy(model) if config.ema_decay is not None else None
        scaler = grad_scaler(device, config.precision)
        steps_per_epoch = math.ceil(data.train_size / config.batch_size)
        schedule = _schedule(config, steps_per_epoch)
        result, step, first_epoch = TrainResult(ema if ema is not None else model), 0, 1
        if resume is not None:
            model.load_state_dict(resume["model"])
            optimizer.load_state_dict(resume["optimizer"])
            scaler.load_state_dict(resume["scaler"])
            if ema is not None:
                ema.load_state_dict(resume["ema"])
            restore_random_states(resume["random"])
            step, first_epoch = resume["step"], resume["epoch"] + 1
            result.history = list(resume["history"])
        network = model if ranks == 1 else wrap(model, device)  # after loading a run state
        total_steps = config.epochs * steps_per_epoch
        if config.ema_decay is not None:
            slow = ema_warning(config.ema_decay, total_steps)
            if slow is not None:
                self.warn(slow)
        for epoch in range(first_epoch, config.epochs + 1):
            epoch_start = time.time()
            for plugin in self.plugins:
                plugin.epoch_start(self, epoch)
            model.train()
            for bn in frozen_bns:
                bn.eval()
            progress = Progress(steps_per_epoch, f"{self.label} epoch {epoch}/{config.epochs}",
                                enabled=self.progress)
            loss_sum, seen, train_start = 0.0, 0, time.time()
            wrong = torch.zeros((), dtype=torch.int64, device=device)  # summed on the device
            batches = (data.train_batches(config.batch_size, config.seed, epoch) if ranks == 1
                       else data.train_batches(config.batch_size, config.seed, epoch, rank, ranks))
            for batch, (inputs, targets) in enumerate(batches):
                inputs, targets = to_device(inputs, device), to_device(targets, device)
                if config.channels_last:
                    inputs = inputs.contiguous(memory_format=torch.channels_last)
                for group in optimizer.param_groups:
                    group["lr"] = schedule(step)
                with autocast(device, config.precision):
                    logits = network(inputs)
                    task = config.task_weight * F.cross_entropy(
                        logits, targets, label_smoothing=config.label_smoothing)
                    loss = task
                    context = Step(model, inputs, targets, logits, epoch, step)
                    for plugin in self.plugins:
                        term = plugin.loss(context)
                        if term is not None:
                            loss = loss + term
                value = loss.item()  # the step's one wait for the device: check, running loss
                if not math.isfinite(value):
                    raise TrainingError(
                        f"the loss is {value} at epoch {epoch}, step {batch + 1}: "
                        f"training diverged (try a lower --lr)")
                optimizer.zero_grad(set_to_none=True)
                if ranks > 1:  # this process's share of the global batch (archc.train.distributed)
                    share = len(targets) * ranks / min(
                        config.batch_size, data.train_size - batch * config.batch_size)
                    scaler.scale(loss + (share - 1.0) * task).backward()
                else:
                    scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                if ema is not None:
                    _ema_update(ema, model, config.ema_decay)
                loss_sum += value * len(targets)
                wrong += (logits.argmax(1) != targets).sum()
                seen += len(targets)
                step += 1
                rate = seen * ranks / max(time.time() - train_start, 1e-9)
                progress.update(batch + 1, f"loss {loss_sum / seen:.4f}, {rate:.0f} images/s, "
                                f"ETA {_duration((total_steps - step) * config.batch_size / rate)}")
            progress.close()
            wrong = int(wrong)
            if ranks > 1:
                loss_sum, wrong, seen = all_sum([loss_sum, wrong, seen], device)
                seen = round(seen)
            metrics = {"epoch": epoch, "lr": schedule(step - 1), "train_loss": loss_sum / seen,
                       "train_error": 100.0 * wrong / seen, "images": seen,
                       "images_per_second": seen / max(time.time() - train_start, 1e-9)}
            kept = {"val": model} if ema is None else {"val": model, "ema_val": ema}
            if ranks > 1:
                broadcast_buffers(*kept.values())
            for prefix, evaluated in kept.items():
                if ranks == 1:
                    sums = _evaluation_sums(evaluated, data.val_batches(config.batch_size), device)
                else:
                    sums = all_sum(_evaluation_sums(evaluated, data.val_batches(
                        config.batch_size, rank, ranks), device), device)
                for key, value in _evaluation_metrics(*sums).items():
                    metrics[f"{prefix}_{key}"] = value
            metrics["seconds"] = time.time() - epoch_start
            result.history.append(metrics)
            for plugin in self.plugins:
                plugin.epoch_end(self, epoch, metrics)
            if self.metrics_jsonl is not None:
                with atomic_output(self.metrics_jsonl) as temporary:
                    temporary.write_text("".join(json.dumps(line) + "\n"
                                                 for line in result.history))
            if self.save_every and (epoch % self.save_every == 0 or epoch == config.epochs):
                save_run_state(self.state_path, {
                    "epoch": epoch, "step": step, "history": result.history,
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict(),
                    "ema": ema.state_dict() if ema is not None else None,
                    "random": random_states()}, self.identity)
        result.seconds = time.time() - start
        result.model = result.model.to("cpu", memory_format=torch.contiguous_format).eval()
        return result


def evaluate(model: nn.Module | Callable[[Tensor], Tensor], x: np.ndarray, y: np.ndarray,
             batch_size: int = 256, device: torch.device | str = "cpu",
             predictions: list[tuple[int, int]] | None = None) -> dict[str, float]:
    """Mean cross-entropy, top-1 error and accuracy (percent) of `model` in eval mode, in
    float32, with the batches on `device` (where an nn.Module must already be); `predictions`
    as in `evaluate_batches`."""
    return evaluate_batches(model, ((torch.from_numpy(x[start:start + batch_size]),
                                     torch.from_numpy(y[start:start + batch_size]))
                                    for start in range(0, len(y), batch_size)), device,
                            predictions)


def evaluate_batches(model: nn.Module | Callable[[Tensor], Tensor],
                     batches: Iterable[tuple[Tensor, Tensor]],
                     device: torch.device | str = "cpu",
                     predictions: list[tuple[int, int]] | None = None) -> dict[str, float]:
    """`evaluate` over (inputs, targets) batches (a data set's `val_batches`); (label, top-1
    class) of every example, in the batches' order, is appended to `predictions` when it is
    given (paired tests of two models need them: archc.common.accuracy_stats)."""
    return _evaluation_metrics(*_evaluation_sums(model, batches, device, predictions))


def _evaluation_sums(model: nn.Module | Callable[[Tensor], Tensor],
                     batches: Iterable[tuple[Tensor, Tensor]],
                     device: torch.device | str,
                     predictions: list[tuple[int, int]] | None = None) -> tuple[float, int, int]:
    """(summed cross-entropy, wrong, seen) of `model` in eval mode over `batches`; the
    (label, top-1) pairs appended to `predictions` when given."""
    device = torch.device(device)
    if isinstance(model, nn.Module):
        was_training = model.training
        model.eval()
    losses, wrong, seen = [], torch.zeros((), dtype=torch.int64, device=device), 0
    pairs: list[tuple[Tensor, Tensor]] = []
    with torch.no_grad():
        for inputs, targets in batches:  # read back at the end: no wait for the device per batch
            inputs, targets = to_device(inputs, device), to_device(targets, device)
            logits = model(inputs).float()
            losses.append(F.cross_entropy(logits, targets, reduction="sum"))
            top1 = logits.argmax(1)
            wrong += (top1 != targets).sum()
            seen += len(targets)
            if predictions is not None:
                pairs.append((targets, top1))
    if isinstance(model, nn.Module):
        model.train(was_training)
    for targets, top1 in pairs:
        predictions.extend(zip(targets.tolist(), top1.tolist(), strict=True))
    return sum(loss.item() for loss in losses), int(wrong), seen


def _evaluation_metrics(loss_sum: float, wrong: float, seen: float) -> dict[str, float]:
    error = 100.0 * wrong / seen
    return {"loss": loss_sum / seen, "error": error, "accuracy": 100.0 - error}


def _duration(seconds: float) -> str:
    """`1h02m`, `3m05s` or `42s`."""
    seconds = max(0, round(seconds))
    hours, minutes = divmod(seconds // 60, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{seconds % 60:02d}s" if minutes else f"{seconds}s"


def _schedule(config: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    total = config.epochs * steps_per_epoch
    warmup = min(total, round(config.warmup_epochs * steps_per_epoch))

    def lr(step: int) -> float:
        if step < warmup:
            return config.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return config.lr * 0.5 * (1.0 + math.cos(math.pi * progress))

    return lr


def _freeze(model: nn.Module, patterns: Sequence[str]) -> tuple[list[nn.Module], list[str]]:
    """Freeze the parameters matching `patterns`; return the BNs to keep in eval mode and the
    patterns that matched no parameter."""
    if not patterns:
        return [], []
    matched = set()
    for name, parameter in model.named_parameters():
        hits = {pattern for pattern in patterns if fnmatch.fnmatchcase(name, pattern)}
        if hits:
            parameter.requires_grad_(False)
            matched |= hits
    return [module for module in model.modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine
            and not module.weight.requires_grad and not module.bias.requires_grad], [
        pattern for pattern in patterns if pattern not in matched]


def ema_warning(decay: float, steps: int) -> str | None:
    """A warning when an EMA of `decay` is too slow for a run of `steps` optimizer steps: the
    initial (random) weights keep a weight decay**steps in the final average, more than 1% when
    the run is shorter than about 4.6 of the average's horizons 1/(1 - decay); the suggested
    decay has a horizon of a tenth of the run (initial weight e^-10)."""
    kept = decay ** steps
    if kept <= 0.01:
        return None
    rate = 10.0 / steps  # 1 - decay for a horizon of steps / 10, rounded up to 2 digits
    unit = 10.0 ** (math.floor(math.log10(rate)) - 1)
    fits = 1.0 - math.ceil(round(rate / unit, 6)) * unit
    advice = (f"use --ema {fits:.{max(0, -round(math.log10(unit)))}f} or less (an average over "
              f"about the last tenth of the run)" if fits >= 0.5 else
              "the run is too short for an EMA")
    return (f"--ema {decay:g} averages over about {1 / (1 - decay):,.0f} steps but the run has "
            f"{steps:,}: the final EMA still holds {100 * kept:.0f}% of the initial random "
            f"weights; {advice}")


def _ema_copy(model: nn.Module) -> nn.Module:
    ema = copy.deepcopy(model)
    for parameter in ema.parameters():
        parameter.requires_grad_(False)
    return ema


def _ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    with torch.no_grad():
        for average, current in zip(ema.parameters(), model.parameters()):
            average.mul_(decay).add_(current.detach(), alpha=1.0 - decay)
        for average, current in zip(ema.buffers(), model.buffers()):
            average.copy_(current)


def train_spec(spec: dict[str, Any], *, data: str, epochs: int, seed: int = 0,
               config: dict[str, Any] | None = None) -> dict[str, Any]:
    """The built-in sweep trainer: build `spec` (archc's pycls init, `seed`), train it on `data`
    with `TrainConfig(**config)`; return the metrics (`TrainResult.metrics`).

    A user's trainer (`archc space sweep --trainer module:function`) is called the same way and
    must return a mapping with at least `best_error` (percent), and `errors` per epoch if it has
    them. `config` holds the CLI's training options, including `device` (as typed, e.g. `auto`,
    for `archc.train.device.resolve_device` on the machine that trains) and `precision` (fp32,
    bf16 or fp16; `archc.train.device.autocast` and `grad_scaler`), so a user's trainer gets the
    same device and precision settings as this one."""
    from archc.frontend.loading import spec_from_mapping
    from archc.frontend.lower import build
    from archc.train.data import open_data

    model_spec = spec_from_mapping(spec, f"spec {spec.get('name', '')}")
    dataset = open_data(data, model_spec.input.channels, model_spec.input.size)
    check_classes(model_spec.num_classes, dataset)
    options = dict(config or {}, epochs=epochs, seed=seed)
    options["freeze"] = tuple(options.get("freeze", ()))
    # the sweep warns about its configuration once, before any model trains (archc.cli.space)
    trainer = Trainer(TrainConfig(**options), progress=False, warn=lambda text: None)
    result = trainer.fit(build(model_spec, seed=seed), dataset)
    return result.metrics()


def check_classes(num_classes: int, dataset: Dataset | ImageFolder) -> str | None:
    """`DataError` when the data has more classes than the model outputs; a warning (returned)
    when it has fewer: legal, but the extra outputs are never a target."""
    if dataset.classes > num_classes:
        raise DataError(
            f"the model has {num_classes} outputs but {dataset.name} has {dataset.classes} "
            f"classes: set num_classes: {dataset.classes} in the spec")
    if dataset.classes < num_classes:
        return (f"the model has {num_classes} outputs but {dataset.name} has "
                f"{dataset.classes} classes: outputs {dataset.classes}..{num_classes - 1} are "
                f"never a target (set num_classes: {dataset.classes} in the spec)")
    return None
