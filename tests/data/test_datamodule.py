"""The DataModule under Lightning: the data-parallel rank, and the data position in checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from trainer.config import DataConfig
from trainer.data import (
    TokenDataModule,
)

from .helpers import (
    arange_dataset,
)


def test_data_module_reads_the_data_parallel_rank_from_the_strategy(tmp_path):
    import pytorch_lightning as pl

    url = arange_dataset(tmp_path, 4 * 40 + 1)
    module = TokenDataModule(DataConfig(path=url, seq_len=4, micro_batch_size=2), seed=0)
    assert module.data_parallel() == (0, 1) and module.batches_per_epoch == 20
    module.trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False)
    assert module.data_parallel() == (0, 2) and module.batches_per_epoch == 10


class _Recorder:
    """A LightningModule that trains one scalar and remembers every batch it was given."""

    @staticmethod
    def build():
        import pytorch_lightning as pl

        class Recorder(pl.LightningModule):
            def __init__(self):
                super().__init__()
                self.weight = torch.nn.Parameter(torch.zeros(()))
                self.seen: list[torch.Tensor] = []

            def training_step(self, batch, batch_idx):
                inputs, targets = batch
                self.seen.append(inputs.clone())
                return (self.weight - targets.float().mean()) ** 2

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.01)

        return Recorder()


def _fit(url: str, ckpt_dir: Path, max_steps: int, every: int, ckpt_path: str | None = None):
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint

    model = _Recorder.build()
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, logger=False,
        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
        callbacks=[ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=every, save_top_k=-1,
                                   filename="{step}")])
    data = TokenDataModule(DataConfig(path=url, seq_len=4, micro_batch_size=2), seed=5)
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    return model.seen


@pytest.mark.parametrize("resume_step", [3, 5])  # mid-epoch, and exactly at the epoch's end
def test_lightning_checkpoint_resumes_the_data_position(tmp_path, resume_step):
    url = arange_dataset(tmp_path, 4 * 10 + 1)  # 5 batches per epoch
    full = _fit(url, tmp_path / "ckpt", max_steps=12, every=resume_step)
    resumed = _fit(url, tmp_path / "ckpt2", max_steps=12, every=100,
                   ckpt_path=str(tmp_path / "ckpt" / f"step={resume_step}.ckpt"))
    assert len(resumed) == 12 - resume_step
    for got, expected in zip(resumed, full[resume_step:], strict=True):
        assert torch.equal(got, expected)
