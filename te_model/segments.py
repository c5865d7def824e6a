"""Which tokens attend to which: one description for plain, padded and packed rows.

Every row is cut into segments: runs of consecutive tokens that attend causally to each other only.
A padded row is split into its padding and its real tokens; a packed row starts a new segment where
`position_ids` restart. The torch layer turns the segments into a block-diagonal causal mask; the TE
layer hands the same boundaries to its THD attention as `cu_seqlens`. The plan is made once per model
forward, from the host's position ids, so it costs no host sync. `max_seqlen` and the segment count
are bucketed to powers of two, so TE re-selects its attention backend only a few times per run.
"""

import dataclasses
from dataclasses import dataclass

import torch


MAX_SEQLEN_ALIGN = 64


def bucket_max_seqlen(longest: int, row_length: int) -> int:
    """The `max_seqlen` handed to TE: the next power of two at or above the longest segment (at least
    `MAX_SEQLEN_ALIGN`), never past the row length rounded up to `MAX_SEQLEN_ALIGN`.

    TE re-selects its attention backend in Python for every distinct value it is handed. With packed
    rows the exact longest document differs from batch to batch, so exact values would cost that
    selection nearly every step. Rounded, a 4096-token row has at most seven values, each selected once.
    (TE 2.20's cuDNN graph cache for THD keys on bucketed token and segment counts, not on `max_seqlen`.)
    """
    bucket = max(MAX_SEQLEN_ALIGN, 1 << (longest - 1).bit_length())
    return min(bucket, -(-row_length // MAX_SEQLEN_ALIGN) * MAX_SEQLEN_ALIGN)


class MaskError(ValueError):
    """An attention mask or position ids the layers cannot represent."""


@dataclass(frozen=True)
class AttentionPlan:
    """Segment layout of one batch of shape (batch, seq)."""

    segment_ids: torch.Tensor  # (B, S) int64, unique across the whole batch
    cu_seqlens: torch.Tensor  # (num_segments + 1,) int32, offsets into the flattened B*S tokens; ends in
    # empty segments (the last offset repeated) up to a power-of-two count when a row holds several
    max_seqlen: int
    one_segment_per_row: bool  # plain causal rows: the fast path needs no mask at all
    rope_angles: torch.Tensor | None = None  # (max_seqlen, 1, 1, head_dim) for TE's fused RoPE
    graphed: bool = False  # widened to the layout the layers' CUDA graphs were captured for (te_model.graphs)

    def to(self, device: torch.device) -> "AttentionPlan":
        """The plan's tensors on `device`, copied without waiting for it (`to_device`). A plan made from the
        host's position ids and moved so costs the device no host sync; one made on the device costs two."""
        def move(t):
            return None if t is None else to_device(t, device)

        return dataclasses.replace(self, segment_ids=move(self.segment_ids), cu_seqlens=move(self.cu_seqlens),
                                   rope_angles=move(self.rope_angles))

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.segment_ids.shape)

    def block_causal_mask(self) -> torch.Tensor:
        """(B, 1, S, S) bool, True where a query may attend to a key (torch SDPA convention)."""
        seg = self.segment_ids
        same = seg[:, :, None] == seg[:, None, :]
        causal = torch.ones(seg.shape[1], seg.shape[1], dtype=torch.bool, device=seg.device).tril()
        return (same & causal)[:, None]


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` on `device`; a host tensor bound for a GPU goes through pinned memory and is copied
    asynchronously, so the host does not wait for the work already queued on the GPU (a copy from pageable
    memory does)."""
    if tensor.device == device or device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def _check_padding(mask: torch.Tensor) -> None:
    """Each row must be one run of real tokens: left padding, right padding, or none."""
    real = mask.bool()
    changes = (real[:, 1:] != real[:, :-1]).sum(dim=1)
    # one change: right (1..1 0..0) or left (0..0 1..1) padding; none: an unpadded row
    bad = (changes > 1) | ((changes == 0) & ~real[:, 0])
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise MaskError(
            f"attention_mask row {row} is not left or right padding around one run of tokens "
            f"(or has no real token)"
        )


def plan_attention(
    batch: int,
    seqlen: int,
    position_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    device: torch.device | None = None,
) -> AttentionPlan:
    """Cut each row into causal segments from its position ids and padding mask.

    - no mask, positions 0..S-1: one segment per row (plain causal);
    - an HF padding mask (left or right): padding and real tokens are separate segments, so real tokens
      never see padding (what padding tokens compute is ignored, as in HF);
    - packed rows: a new segment starts wherever `position_ids` do not continue by +1.

    Made on a GPU, the plan's segment starts and `max_seqlen` cost host syncs. The training loop makes
    it on the host and hands it in (`AttentionPlan.to`), which costs none.

    The segment count is TE's THD batch size, and every new count re-runs TE's backend selection too.
    So `cu_seqlens` is padded with empty segments (the last offset repeated) up to the next power of
    two: a batch of 100 to 400 documents shows TE three counts, not hundreds. Empty segments change no
    output or gradient. Plain rows (one segment per row) need no padding.
    """
    if position_ids is None:
        position_ids = torch.arange(seqlen, device=device)[None]
    position_ids = position_ids.expand(batch, seqlen)
    starts = torch.ones(batch, seqlen, dtype=torch.bool, device=position_ids.device)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    if attention_mask is not None:
        if attention_mask.dim() != 2 or tuple(attention_mask.shape) != (batch, seqlen):
            raise MaskError(
                f"attention_mask must be a 2-D padding mask of shape {(batch, seqlen)}, "
                f"got {tuple(attention_mask.shape)}"
            )
        _check_padding(attention_mask)
        starts[:, 1:] |= attention_mask[:, 1:] != attention_mask[:, :-1]
    segment_ids = starts.flatten().cumsum(0).view(batch, seqlen) - 1
    flat_starts = starts.flatten().nonzero().flatten()
    total = torch.tensor([batch * seqlen], device=flat_starts.device)
    cu_seqlens = torch.cat([flat_starts, total]).to(torch.int32)
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    segments = len(lengths)
    if segments != batch:  # empty segments up to a power of two (see the docstring)
        empty = (1 << (segments - 1).bit_length()) - segments
        cu_seqlens = torch.cat([cu_seqlens, cu_seqlens[-1:].expand(empty)])
    return AttentionPlan(
        segment_ids=segment_ids,
        cu_seqlens=cu_seqlens,
        max_seqlen=bucket_max_seqlen(int(lengths.max()), seqlen),
        one_segment_per_row=segments == batch,
    )
