"""An optimizer's state written through a checkpoint's own files and read back into another optimizer."""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.train import checkpoint as ckpt


def through_checkpoint_files(module: torch.nn.Module, saved: torch.optim.Optimizer, fresh: torch.optim.Optimizer,
                             folder: Path) -> torch.optim.Optimizer:
    """`saved`'s state as `optimizer.safetensors` in `folder` (a new file each call), loaded into `fresh`."""
    entries, groups = ckpt.optimizer_entries(module, saved)
    path = folder / f"optimizer-{len(list(folder.iterdir()))}.safetensors"
    ckpt.save_streamed(entries, path)
    ckpt.load_optimizer_state(module, fresh, path, groups)
    return fresh
