"""What every rank of a ``TorchEstimator`` fit runs: DDP over the rank's share, one checkpoint per epoch.

Called through ``sparkhydrogen.torch.run(train_rank, spec, num_processes=N, data=frame)``:
the process group is already initialised, the rank reads its share with
``sparkhydrogen.torch.data_loader(..., cache=True)`` (one pass from Spark, later epochs
replayed from memory). Every epoch ends with one ``allGather`` of the ranks' metrics and a
gang checkpoint (``ctx.checkpoint``) of the model, the optimizer, the loader's position and the
metrics so far; a relaunched gang (``max_retries``) restores it and goes on with the next epoch,
in the order an uninterrupted run has (shuffled or not).

Torch is imported inside the functions: importing this module on the driver does not.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .columns import FEATURES, LABEL, VALID

__all__ = ["TorchTrainSpec", "RankResult", "train_rank", "build_module", "build_loss", "build_optimizer",
           "label_like"]

log = logging.getLogger("sparkhydrogen.ml")


@dataclass(frozen=True)
class TorchTrainSpec:
    """Everything a rank needs to train (pickled once into the gang's task closure)."""

    model: Any
    loss: Any
    optimizer: Any = None
    optimizer_params: Mapping[str, Any] = field(default_factory=dict)
    batch_size: int = 32
    epochs: int = 1
    shuffle: bool = True
    seed: int = 0
    validation: bool = False
    metrics: Mapping[str, Callable[[Any, Any], float]] = field(default_factory=dict)


@dataclass(frozen=True)
class RankResult:
    """Rank 0's answer: the trained weights, the shapes seen, and every epoch's metrics of every rank."""

    state_dict: dict[str, Any]
    input_width: int
    output_width: int
    history: list[list[dict[str, float]]]
    resumed_from_epoch: int
    attempts: int


def build_module(model: Any) -> Any:
    """A fresh ``nn.Module``: a deep copy of ``model``, or what the factory ``model()`` returns."""
    import torch

    if isinstance(model, torch.nn.Module):
        return copy.deepcopy(model)
    if callable(model):
        module = model()
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"the model factory returned {type(module).__name__}, not a torch.nn.Module")
        return module
    raise TypeError(f"model must be a torch.nn.Module or a zero-argument factory, got {type(model).__name__}")


def build_loss(loss: Any) -> Callable[[Any, Any], Any]:
    """The loss as a callable: a module or function as given, a loss class instantiated."""
    if isinstance(loss, type):
        return loss()  # type: ignore[no-any-return]
    if callable(loss):
        return loss  # type: ignore[no-any-return]
    raise TypeError(f"loss must be a callable, a torch loss module or a loss class, got {loss!r}")


def build_optimizer(optimizer: Any, parameters: Any, options: Mapping[str, Any]) -> Any:
    """``optimizer(parameters, **options)``; ``torch.optim.Adam`` when ``optimizer`` is ``None``."""
    import torch

    make = torch.optim.Adam if optimizer is None else optimizer
    if not callable(make):
        raise TypeError(f"optimizer must be a torch optimizer class or a factory, got {optimizer!r}")
    return make(parameters, **dict(options))


def label_like(output: Any, label: Any) -> Any:
    """The label in the form the loss expects: class indices (long) for a multi-output model and a scalar
    label, else float shaped like the output."""
    import torch

    if output.dim() > 1 and output.shape[-1] > 1 and label.dim() == 1:
        return label.to(torch.long)
    label = label.to(output.dtype)
    return label.reshape(output.shape) if label.numel() == output.numel() else label


class _Tally:
    """Row-weighted running means of named values."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.rows = 0

    def add(self, values: Mapping[str, float], rows: int) -> None:
        for name, value in values.items():
            self.sums[name] = self.sums.get(name, 0.0) + float(value) * rows
        self.rows += rows

    def means(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}{name}": total / self.rows for name, total in self.sums.items()} if self.rows else {}


def _measure(spec: TorchTrainSpec, loss_fn: Callable[[Any, Any], Any], output: Any, label: Any) -> dict[str, float]:
    values = {"loss": float(loss_fn(output, label_like(output, label)).detach())}
    for name, metric in spec.metrics.items():
        values[name] = float(metric(output.detach(), label))
    return values


def train_rank(spec: TorchTrainSpec) -> RankResult | None:
    """One rank's training loop (see the module docstring); rank 0 returns the result, the others ``None``."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    import sparkhydrogen as h2
    import sparkhydrogen.torch as h2torch

    ctx = h2.BarrierTaskContext.get()
    rank, device = ctx.rank(), h2torch.device()
    torch.manual_seed(spec.seed)
    module = build_module(spec.model).to(device)
    loss_fn = build_loss(spec.loss)
    restored = ctx.restore()
    start = 0
    history: list[list[dict[str, float]]] = []
    if restored is not None:
        module.load_state_dict(restored["model"])
        start, history = restored["epoch"], restored["history"]
        log.info("rank %d resumes at epoch %d from the gang's checkpoint", rank, start)
    ddp = DistributedDataParallel(module) if dist.is_available() and dist.is_initialized() else module
    optimizer = build_optimizer(spec.optimizer, ddp.parameters(), spec.optimizer_params)
    if restored is not None:
        optimizer.load_state_dict(restored["optimizer"])
    columns = [FEATURES, LABEL] + ([VALID] if spec.validation else [])
    loader = h2torch.data_loader(spec.batch_size, columns=columns, shuffle=spec.shuffle, seed=spec.seed, cache=True)
    if restored is not None and restored.get("loader") is not None:
        loader.load_state_dict(restored["loader"])  # the next epoch, in the order an uninterrupted run has
    held_out: list[tuple[Any, Any]] = []
    widths = (0, 0)
    for epoch in range(start, spec.epochs):
        ddp.train()
        tally = _Tally()
        first_pass = epoch == start
        for batch in loader:
            x, y = batch[FEATURES].to(device, torch.float32), batch[LABEL].to(device)
            if spec.validation:
                valid = batch[VALID].to(device)
                if first_pass and bool(valid.any()):
                    held_out.append((x[valid], y[valid]))
                x, y = x[~valid], y[~valid]
            optimizer.zero_grad()
            if len(x) == 0:  # every row of this batch is held out: a zero step keeps DDP's all-reduce in step
                output = ddp(batch[FEATURES][:1].to(device, torch.float32))
                (output.sum() * 0.0).backward()
                optimizer.step()
                continue
            output = ddp(x)
            loss = loss_fn(output, label_like(output, y))
            loss.backward()
            optimizer.step()
            tally.add(_measure(spec, loss_fn, output, y), len(x))
            widths = (x.shape[-1], output[0].numel())
        metrics = tally.means("train_")
        if spec.validation:
            metrics.update(_validate(spec, module, loss_fn, held_out))
        history.append(ctx.allGather(metrics))
        ctx.checkpoint({"epoch": epoch + 1, "model": _cpu(module.state_dict()), "optimizer": optimizer.state_dict(),
                        "history": history, "loader": loader.state_dict()})
        if rank == 0:
            log.info("epoch %d: %s", epoch, ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    if widths == (0, 0):
        widths = _widths(module, loader, device)
    if rank != 0:
        return None
    return RankResult(state_dict=_cpu(module.state_dict()), input_width=widths[0], output_width=widths[1],
                      history=history, resumed_from_epoch=start, attempts=ctx.gangAttempt() + 1)


def _validate(spec: TorchTrainSpec, module: Any, loss_fn: Callable[[Any, Any], Any],
              held_out: list[tuple[Any, Any]]) -> dict[str, float]:
    import torch

    tally = _Tally()
    module.eval()
    with torch.no_grad():
        for x, y in held_out:
            tally.add(_measure(spec, loss_fn, module(x), y), len(x))
    return tally.means("val_")


def _widths(module: Any, loader: Any, device: Any) -> tuple[int, int]:
    """Feature and output widths when the last epoch trained on nothing (every epoch restored)."""
    import torch

    for batch in loader:
        x = batch[FEATURES][:1].to(device, torch.float32)
        with torch.no_grad():
            return x.shape[-1], module(x)[0].numel()
    raise ValueError("the training DataFrame has no rows on this rank")


def _cpu(state: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v.detach().cpu().clone() if hasattr(v, "detach") else v for k, v in state.items()}
