"""Lightning ``Trainer(strategy="ddp", accelerator="cpu", devices=2)`` with ShardedOptimizer (ZeRO-2) and a
per-step LR scheduler: trains 3 epochs with a checkpoint per epoch, then a second fit resumes from the checkpoint
of epoch 2; the same for ``Lookahead(ShardedOptimizer)``.

    python tests/support/lightning_job.py OUT

Lightning's own launcher starts the second process (it re-runs this script).  Global rank 0 writes
``OUT/lightning.pt``: per scenario, the losses and the final parameters of both fits, and the checkpoint files.
Epoch-end checkpoints because Lightning restarts a dataloader from its beginning when it resumes mid-epoch.
"""
from __future__ import annotations

import os
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

EPOCHS, STEPS_PER_EPOCH, BATCH, LR = 3, 4, 8, 1e-2


class Regression(torch.utils.data.Dataset):
    """A fixed random linear map to learn (2 ranks x BATCH x STEPS_PER_EPOCH samples per epoch)."""

    def __init__(self):
        g = torch.Generator().manual_seed(3)
        self.x = torch.randn(2 * BATCH * STEPS_PER_EPOCH, 12, generator=g)
        self.y = torch.tanh(self.x @ torch.randn(12, 3, generator=g))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


def build(lookahead: bool):
    import lightning as L
    from sharded_optim import Lookahead, ShardedOptimizer

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 3))
            self.losses: list[float] = []

        def training_step(self, batch, _index):
            x, y = batch
            loss = nn.functional.mse_loss(self.net(x), y)
            self.losses.append(float(loss))
            return loss

        def configure_optimizers(self):
            # Lightning wraps the model in DDP, which averages the gradients: reduce_grads=False
            opt = ShardedOptimizer(self.parameters(), algorithm="adamw", lr=LR, zero_stage=2, reduce_grads=False,
                                   kernel="eager")
            if lookahead:
                opt = Lookahead(opt, k=3)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.95 ** step)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

        def train_dataloader(self):
            return torch.utils.data.DataLoader(Regression(), batch_size=BATCH, shuffle=False)

    return Module()


def fit(out: Path, name: str, lookahead: bool, resume: Path | None) -> tuple[object, object]:
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from sharded_optim.integrations.lightning import ShardedOptimizerCallback

    module = build(lookahead)
    ckpt = ModelCheckpoint(dirpath=out / name, every_n_epochs=1, save_top_k=-1, filename="{epoch}-{step}")
    trainer = L.Trainer(strategy="ddp", accelerator="cpu", devices=2, max_epochs=EPOCHS, logger=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[ckpt, ShardedOptimizerCallback()])
    start = time.perf_counter()
    trainer.fit(module, ckpt_path=str(resume) if resume else None)
    print(f"fit {name}: {time.perf_counter() - start:.1f} s", flush=True)
    return trainer, module


def main(argv: list[str]) -> None:
    out = Path(argv[0])
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    results: dict = {}
    for name, lookahead in (("zero2", False), ("lookahead_zero2", True)):
        trainer, full = fit(out, name, lookahead, None)
        files = sorted(p.name for p in (out / name).glob("*.ckpt"))
        resumed_from = out / name / f"epoch=1-step={2 * STEPS_PER_EPOCH}.ckpt"
        _, resumed = fit(out, name + "_resumed", lookahead, resumed_from)
        results[name] = {"losses": full.losses, "resumed_losses": resumed.losses, "checkpoints": files,
                         "params": {n: p.detach().clone() for n, p in full.named_parameters()},
                         "resumed_params": {n: p.detach().clone() for n, p in resumed.named_parameters()},
                         "optimizer": type(trainer.optimizers[0]).__name__}
    from tests.support.snippets import run_snippet
    os.chdir(out)  # the snippet writes relative paths
    data = Regression()
    snippet = run_snippet("lightning", loader=torch.utils.data.DataLoader(data, batch_size=BATCH))
    results["snippet"] = {"steps": snippet["trainer"].global_step,
                          "optimizer": type(snippet["trainer"].optimizers[0]).__name__,
                          "checkpoints": sorted(str(p.relative_to(out)) for p in (out / "pl_out").rglob("*.ckpt"))}
    if trainer.global_rank == 0:
        torch.save(results, out / "lightning.pt")


if __name__ == "__main__":
    os.environ.setdefault("SHARDED_OPTIM_KERNEL", "eager")
    main(sys.argv[1:])
