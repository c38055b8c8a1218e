"""What every rank of a ``LightningEstimator`` fit runs: ``Trainer.fit`` under the launcher's environment.

The rank's share comes from ``sparkhydrogen.torch.data_loader(..., cache=True)``; batches reach
the ``LightningModule`` as ``(features, label)`` tuples (features float32). Validation rows
(a flag column) go to ``validation_step`` when the module has one. A callback gathers the
epoch's logged metrics of every rank (``self.log("train_loss", ...)``) and commits a gang
checkpoint of the weights and optimizer states; a relaunched gang restores them and trains
the remaining epochs.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from .columns import FEATURES, LABEL, VALID
from .torch_rank import RankResult, build_module

__all__ = ["LightningTrainSpec", "train_lightning_rank"]


@dataclass(frozen=True)
class LightningTrainSpec:
    """What a rank needs: the module (or factory), batching, epochs and extra ``Trainer`` keywords."""

    model: Any
    batch_size: int = 32
    epochs: int = 1
    shuffle: bool = True
    seed: int = 0
    validation: bool = False
    trainer_params: Mapping[str, Any] = field(default_factory=dict)


class _Tuples:
    """The loader's dict batches as ``(features, label)``, keeping only the training (or validation) rows."""

    def __init__(self, loader: Any, validation: bool, held_out: bool) -> None:
        self.loader, self.validation, self.held_out = loader, validation, held_out

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        import torch

        for batch in self.loader:
            x, y = batch[FEATURES].to(torch.float32), batch[LABEL]
            if self.validation:
                keep = batch[VALID] if self.held_out else ~batch[VALID]
                x, y = x[keep], y[keep]
            yield x, y


def train_lightning_rank(spec: LightningTrainSpec) -> RankResult | None:
    """One rank: fit for the remaining epochs, gathering metrics and checkpointing at every epoch's end."""
    import lightning.pytorch as pl
    import torch

    import sparkhydrogen as h2
    import sparkhydrogen.torch as h2torch

    ctx = h2.BarrierTaskContext.get()
    torch.manual_seed(spec.seed)
    module = build_module(spec.model)
    restored = ctx.restore()
    start, history = (restored["epoch"], restored["history"]) if restored is not None else (0, [])
    if restored is not None:
        module.load_state_dict(restored["model"])
    columns = [FEATURES, LABEL] + ([VALID] if spec.validation else [])
    loader = h2torch.data_loader(spec.batch_size, columns=columns, shuffle=spec.shuffle, seed=spec.seed, cache=True)
    widths: list[int] = []

    class Gather(pl.Callback):
        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            if not widths and len(batch[0]):
                with torch.no_grad():
                    widths.extend([batch[0].shape[-1], pl_module(batch[0][:1])[0].numel()])

        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items()
                       if getattr(v, "numel", lambda: 1)() == 1}
            history.append(ctx.allGather(metrics))
            optimizers = [o.state_dict() for o in trainer.optimizers]
            ctx.checkpoint({"epoch": len(history),
                            "model": {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()},
                            "optimizers": optimizers, "history": history})

    plugin = h2torch.lightning_environment()
    options = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
               "enable_model_summary": False, "num_sanity_val_steps": 0, **dict(spec.trainer_params)}
    trainer = pl.Trainer(strategy="ddp", accelerator="cpu", num_nodes=ctx.worldSize(), devices=1,
                         max_epochs=spec.epochs - start, plugins=[plugin], callbacks=[Gather()],
                         use_distributed_sampler=False, **options)
    if restored is not None and restored.get("optimizers"):
        _restore_optimizers(module, restored["optimizers"])
    val = _Tuples(loader, spec.validation, True) if spec.validation and hasattr(module, "validation_step") else None
    if spec.epochs > start:
        trainer.fit(module, train_dataloaders=_Tuples(loader, spec.validation, False), val_dataloaders=val)
    if ctx.rank() != 0:
        return None
    if not widths:
        raise ValueError("no training rows reached rank 0: the DataFrame is empty, or every row is a validation row")
    return RankResult(state_dict={k: v.detach().cpu().clone() for k, v in module.state_dict().items()},
                      input_width=widths[0], output_width=widths[1], history=history, resumed_from_epoch=start,
                      attempts=ctx.gangAttempt() + 1)


def _restore_optimizers(module: Any, states: list[Any]) -> None:
    """Load the checkpointed optimizer states once Lightning has created the optimizers (on ``fit`` start)."""
    original = module.on_train_start

    def on_train_start() -> None:
        for optimizer, state in zip(module.trainer.optimizers, states, strict=False):
            optimizer.load_state_dict(state)
        original()

    module.on_train_start = on_train_start
