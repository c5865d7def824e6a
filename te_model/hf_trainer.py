"""Saving from `transformers.Trainer` as a standard HF checkpoint.

Trainer's own checkpoints hold the TE-style parameter names (right for resuming a Trainer run, wrong for
anything that loads a plain `LlamaForCausalLM`). This callback writes, next to each of Trainer's
checkpoints, an `hf/` folder through `save_hf_checkpoint`, loadable by `AutoModelForCausalLM`.
"""

from pathlib import Path

from transformers import TrainerCallback

from .weights import save_hf_checkpoint


class SaveHFCheckpointCallback(TrainerCallback):
    """On every Trainer save, also write `<output_dir>/checkpoint-<step>/hf` as an HF checkpoint."""

    def __init__(self, max_shard_size: int | str = "5GB"):
        self.max_shard_size = max_shard_size

    def on_save(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero and model is not None:
            out = Path(args.output_dir) / f"checkpoint-{state.global_step}" / "hf"
            save_hf_checkpoint(model, out, max_shard_size=self.max_shard_size)
        return control
