"""Which checkpoints a run keeps: the best by `val/accuracy` (when it validates) and always the latest, no bytes
twice.

`checkpoints/last.ckpt` is the newest state, the one `resume=auto`, `eval` and `export` read. When that state is
also a kept best (`stepNNNNNN.ckpt`), `last.ckpt` is a symbolic link to it (Lightning's `save_last="link"`);
otherwise it is a file of its own. Without validation the kept files are simply the newest `save_top_k`.
"""

from __future__ import annotations

import os

from lightning.pytorch.callbacks import ModelCheckpoint

MONITOR = "val/accuracy"


class BestAndLastCheckpoint(ModelCheckpoint):
    """`ModelCheckpoint` keeping the `save_top_k` best by `val/accuracy` (or the newest, without validation) as
    `stepNNNNNN.ckpt`, and `last.ckpt` as the newest state: a link when that state is a kept file, else a file.

    Why a subclass: Lightning's `save_last="link"` links `last.ckpt` to the file this callback wrote most recently,
    which after a validation that is not a new best is an *older* state; resume would then silently go back in
    time. Here the link is made only when a file was written at the current step, and `last.ckpt` is written in
    full otherwise (the `save_last` setting is Lightning's own; only the choice between its two modes is ours).
    Two more gaps closed: a resumed process (which has written nothing yet) must still refresh `last.ckpt` at its
    validations, and the end of training saves `last.ckpt` when the final steps came after the last save (a
    `max_steps` that is not a multiple of the interval). This file is the one place that reads ModelCheckpoint's
    private state (`_last_global_step_saved`, `_last_checkpoint_saved`, `_monitor_candidates`).
    """

    def __init__(self, dirpath, save_top_k: int, validates: bool, every_n_train_steps: int) -> None:
        super().__init__(
            dirpath=dirpath,
            filename="step{step:06d}",
            auto_insert_metric_name=False,
            save_last="link",
            save_top_k=save_top_k,
            monitor=MONITOR if validates else "step",
            mode="max",
            # With validation, Lightning saves at the end of each validation (the metric exists then); without,
            # every `every_n_train_steps`.
            every_n_train_steps=None if validates else every_n_train_steps,
        )

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)
        # Resuming: a last.ckpt exists, so Lightning's "link" mode must keep refreshing it (see the class doc).
        self._last_checkpoint_saved = self._last_checkpoint_saved or self.last_model_path

    def on_train_end(self, trainer, pl_module) -> None:
        if self._should_skip_saving_checkpoint(trainer):  # fast_dev_run writes nothing (Lightning's own hook would)
            return
        if self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        super().on_train_end(trainer, pl_module)

    def _save_last_checkpoint(self, trainer, monitor_candidates) -> None:
        wrote_now = (
            self._last_global_step_saved == trainer.global_step
            and bool(self._last_checkpoint_saved)
            and os.path.basename(self._last_checkpoint_saved) != self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION
        )
        self.save_last = "link" if wrote_now else True
        try:
            if not wrote_now and trainer.is_global_zero:
                last = self.format_checkpoint_name(monitor_candidates, self.CHECKPOINT_NAME_LAST)
                if os.path.islink(last):  # write a new file, never through the link into a kept checkpoint
                    os.remove(last)
            super()._save_last_checkpoint(trainer, monitor_candidates)
        finally:
            self.save_last = "link"
