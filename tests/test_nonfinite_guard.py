"""The NaN guard names the first parameter with a non-finite gradient and stops before the optimizer step."""

import lightning as L
import pytest
import torch
from torch import nn

from lightning_sp.callbacks import NonFiniteGradientError, NonFiniteGuard


class TwoLayers(L.LightningModule):
    def __init__(self, poison_step: int):
        super().__init__()
        self.first, self.second = nn.Linear(4, 4), nn.Linear(4, 1)
        self.poison_step = poison_step

    def training_step(self, batch, batch_idx):
        x = batch[0]
        if self.global_step == self.poison_step:
            x = x * float("inf")  # an overflowing input: every gradient downstream is NaN
        return self.second(torch.relu(self.first(x))).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_guard_names_the_parameter_and_keeps_the_last_good_weights(tmp_path):
    torch.manual_seed(0)
    model = TwoLayers(poison_step=2)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 4)), batch_size=2)
    snapshots = []

    class Snapshot(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            snapshots.append({k: v.clone() for k, v in pl_module.state_dict().items()})

    trainer = L.Trainer(
        max_steps=4,
        callbacks=[NonFiniteGuard(), Snapshot()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
    )
    with pytest.raises(NonFiniteGradientError, match=r"non-finite gradient in 'first\.weight' at step 2"):
        trainer.fit(model, data)
    for name, value in model.state_dict().items():  # the poisoned step changed nothing
        torch.testing.assert_close(value, snapshots[-1][name])
        assert torch.isfinite(value).all()
