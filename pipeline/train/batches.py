"""This rank's micro-batches of the packed training rows, by data position.

A micro-batch is a pure function of (seed, epoch, rank, world, offset): epoch e's rows are a seeded
permutation, rank r takes rows[r::world] of it, in micro-batches of `train.micro_batch_size`. So a
resume needs only the position (epoch, offset), and every rank gets the same number of micro-batches
per epoch (a remainder is skipped), which keeps DDP in lockstep.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

import te_model
from pipeline import storage
from pipeline.errors import PermanentError, PipelineError

COLUMNS = ("input_ids", "labels", "position_ids")


def read_rows(uri: str, options: storage.StorageOptions) -> pa.Table:
    """The packed-row columns of a prepared parquet file."""
    fs, path = storage.filesystem(uri, options)
    try:
        return pq.read_table(path, filesystem=fs, columns=list(COLUMNS))
    except (OSError, pa.ArrowInvalid, KeyError) as exc:
        raise PipelineError(f"cannot read training rows {uri}: {type(exc).__name__}: {exc}") from None


class RankShard:
    """This rank's micro-batches by position (epoch, offset): rows[rank::world] of each epoch's permutation."""

    def __init__(self, table: pa.Table, seed: int, rank: int, world: int, micro_batch_size: int) -> None:
        self.table, self.seed, self.rank, self.world = table, seed, rank, world
        self.micro_batch_size = micro_batch_size
        self.batches_per_epoch = table.num_rows // world // micro_batch_size
        if not self.batches_per_epoch:
            raise PermanentError(f"the train split has {table.num_rows} rows, fewer than train.workers x "
                                 f"train.micro_batch_size = {world * micro_batch_size}")
        self.seq_len = len(table.column("input_ids")[0])
        self._epoch, self._rows = -1, np.empty(0, dtype=np.int64)

    def _my_rows(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            order = np.random.default_rng((self.seed + epoch) % 2**64).permutation(self.table.num_rows)
            self._epoch, self._rows = epoch, order[self.rank :: self.world]
        return self._rows

    def batch(self, epoch: int, offset: int) -> dict[str, torch.Tensor]:
        start = offset * self.micro_batch_size
        rows = self.table.take(self._my_rows(epoch)[start : start + self.micro_batch_size])
        return {name: torch.from_numpy(_as_matrix(rows.column(name), name)) for name in COLUMNS}

    def device_batch(self, position: tuple[int, int], device: torch.device) -> dict[str, Any]:
        """The micro-batch at `position` as model inputs on `device`, with its attention plan and the
        positions its loss scores found from the host's rows (`te_model.prepare_batch`): neither this nor
        the model's forward and backward waits for the device."""
        return te_model.prepare_batch(self.batch(*position), device)

    def next_position(self, epoch: int, offset: int) -> tuple[int, int]:
        return (epoch, offset + 1) if offset + 1 < self.batches_per_epoch else (epoch + 1, 0)


def _as_matrix(column: pa.ChunkedArray, name: str) -> np.ndarray:
    lists = column.combine_chunks()
    lengths = np.diff(lists.offsets.to_numpy())
    if len(lengths) and lengths.min() != lengths.max():
        raise PermanentError(f"training rows: column {name} mixes row lengths {lengths.min()} and {lengths.max()}")
    return lists.flatten().to_numpy().reshape(len(lists), -1).astype(np.int64)
