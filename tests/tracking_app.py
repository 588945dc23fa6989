"""A stand-in for `python -m trainer` for the tracking tests: the real config tree, the real
`trainer.tracking` and a real Lightning fit of a tiny model on CPU, with Lightning's ModelCheckpoint
writing `<checkpoint.dir>/last.ckpt` (a relative `checkpoint.dir` is under the run directory);
`checkpoint.resume=last` resumes from it.

Test knobs that the schema has no key for come from the environment:
TRACKING_APP_STEP_S (seconds each step sleeps, so a test can kill it mid-run) and
TRACKING_APP_FAIL_AT (the step whose training_step raises).

Prints `checkpoint <step>` after each save and `run <run id>` once the run is open.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint

from trainer import tracking
from trainer.config import dp_size, validate

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")
LAUNCH_SCRIPT = "#!/bin/sh\npython tests/tracking_app.py\n"


class TinyRegression(pl.LightningModule):
    """One linear layer; logs like the real trainer: plain floats through trainer.logger."""

    def __init__(self, lr: float, step_s: float = 0.0, fail_at: int = 0,
                 failure: type[BaseException] = RuntimeError):
        super().__init__()
        self.layer = torch.nn.Linear(8, 1)
        self.lr, self.step_s, self.fail_at, self.failure = lr, step_s, fail_at, failure
        self.logged: list[tuple[int, float]] = []

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        if self.global_step + 1 == self.fail_at:
            raise self.failure(f"injected failure at step {self.fail_at}")
        time.sleep(self.step_s)
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        step, loss = self.trainer.global_step, float(outputs["loss"])
        self.logged.append((step, loss))
        self.trainer.logger.log_metrics({"train/loss": loss, "train/lr": self.lr}, step=step)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        generator = torch.Generator().manual_seed(0)
        data = torch.utils.data.TensorDataset(torch.randn(512, 8, generator=generator),
                                              torch.randn(512, 1, generator=generator))
        return torch.utils.data.DataLoader(data, batch_size=8)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class ReportingCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that tells tracking about each file it writes, as the real one will."""

    def __init__(self, tracking_: tracking.Tracking | None, **kwargs):
        super().__init__(**kwargs)
        self._tracking = tracking_

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        start = time.perf_counter()
        super()._save_checkpoint(trainer, filepath)
        seconds = time.perf_counter() - start
        if self._tracking is not None:
            self._tracking.log_checkpoint(trainer.global_step, Path(filepath).resolve().as_uri(),
                                          seconds, os.path.getsize(filepath))
        print(f"checkpoint {trainer.global_step}", flush=True)


class PrintRunId(pl.Callback):
    """Goes after tracking's callbacks, which open the run at train start."""

    def __init__(self, tracking_: tracking.Tracking):
        self._tracking = tracking_

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        print(f"run {self._tracking.run_id}", flush=True)


def mesh_shape(run) -> dict[str, int]:
    p = run.parallelism
    return {"dp_replicate": dp_size(run) // p.dp_shard, "dp_shard": p.dp_shard, "tp": p.tp}


@hydra.main(version_base=None, config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> None:
    run = validate(cfg)
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    sweep = None
    if hydra_cfg.mode == RunMode.MULTIRUN:
        sweep = tracking.SweepInfo(sweep_dir=hydra_cfg.sweep.dir, job_num=hydra_cfg.job.num)
    track = tracking.setup(run, run_dir=run_dir,
                           resolved_config=OmegaConf.to_container(cfg, resolve=True),
                           overrides=list(hydra_cfg.overrides.task), mesh_shape=mesh_shape(run),
                           rank=0, sweep=sweep, launch_artifact=("launch.sh", LAUNCH_SCRIPT))
    ckpt_dir = run_dir / run.checkpoint.dir
    checkpoints = ReportingCheckpoint(track, dirpath=ckpt_dir, save_top_k=0, save_last=True,
                                      every_n_train_steps=run.checkpoint.every_n_steps)
    trainer = pl.Trainer(max_steps=run.trainer.max_steps, accelerator="cpu", devices=1,
                         logger=track.logger if track else False,
                         callbacks=[checkpoints, *([*track.callbacks, PrintRunId(track)]
                                                   if track else [])],
                         enable_progress_bar=False, enable_model_summary=False)
    model = TinyRegression(run.optim.lr, float(os.environ.get("TRACKING_APP_STEP_S", "0")),
                           int(os.environ.get("TRACKING_APP_FAIL_AT", "0")))
    resume = ckpt_dir / "last.ckpt" if run.checkpoint.resume == "last" else None
    try:
        trainer.fit(model, ckpt_path=resume if resume and resume.exists() else None)
    except BaseException as exc:
        if track:
            track.close(tracking.status_for(exc))
        raise
    if track:
        track.close("FINISHED")


if __name__ == "__main__":
    main()
