"""CUDA graphs of the decoder layers (te_model.graphs): the layout a capture records and how later batches
are widened to it, on CPU. Capture and replay themselves run on the GPU (tests/gpu/test_te.py)."""

import pytest
import torch

import te_model
from te_model.graphs import DecoderGraphs, GraphLayout, graph_layout, widen
from te_model.segments import plan_attention
from tests.support.llama_variants import llama_config


def packed_plan(rows: list[list[int]]):
    positions = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in rows])
    return plan_attention(*positions.shape, position_ids=positions)


def segments(plan) -> list[int]:
    lengths = plan.cu_seqlens.diff()
    return lengths[lengths > 0].tolist()


def test_the_captured_layout_leaves_room_for_packed_batches_and_fixes_plain_ones():
    plain = plan_attention(8, 256)
    assert graph_layout(plain, 8 * 256, 256) == GraphLayout(tokens=2048, offsets=9, max_seqlen=256)
    packed = packed_plan([[100, 100, 56], [256], [16, 200, 40], [128, 128]])  # 10 segments, padded to 16
    assert packed.cu_seqlens.numel() == 17
    assert graph_layout(packed, 4 * 256, 256) == GraphLayout(tokens=1024, offsets=33, max_seqlen=256)
    assert graph_layout(plan_attention(2, 1000), 2000, 1000).max_seqlen == 1024  # the row, rounded up to 64


def test_a_later_batch_is_widened_to_the_layout_without_changing_its_segments():
    graphs = DecoderGraphs(GraphLayout(tokens=1024, offsets=33, max_seqlen=256))
    later = packed_plan([[64] * 4, [32] * 8, [256], [200, 56]])  # 15 segments
    fitted = graphs.fit(later, 1024)
    assert fitted.graphed and not later.graphed
    assert fitted.cu_seqlens.numel() == 33 and fitted.max_seqlen == 256
    assert segments(fitted) == segments(later)
    assert fitted.cu_seqlens[-1] == 1024 and bool((fitted.cu_seqlens.diff() >= 0).all())
    assert torch.equal(fitted.segment_ids, later.segment_ids)
    assert graphs.eager_batches == 0

    crowded = packed_plan([[16] * 16, [16] * 16, [16] * 16, [256]])  # 49 segments: 65 offsets
    assert graphs.fit(crowded, 1024) is None
    assert graphs.fit(plan_attention(2, 256), 512) is None  # another token count
    assert graphs.eager_batches == 2


def test_widening_changes_no_loss_on_the_torch_backend():
    """The widened plan is the same attention: the torch backend reads its segments, and gives the same loss."""
    torch.manual_seed(0)
    model = te_model.build_model(llama_config("llama3", num_hidden_layers=2), backend="torch",
                                 dtype=torch.float32).train()
    rows = [[20, 12], [32], [8, 8, 16], [32]]
    ids = torch.randint(0, model.config.vocab_size, (4, 32))
    positions = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in rows])
    plan = plan_attention(4, 32, position_ids=positions)
    wide = widen(plan, 65, 64)
    losses = [model(input_ids=ids, labels=ids, position_ids=positions, attention_plan=p).loss for p in (plan, wide)]
    assert float(losses[0].detach()) == float(losses[1].detach())


def test_capture_refuses_layers_it_cannot_record():
    model = te_model.build_model(llama_config("llama3", num_hidden_layers=2), backend="torch", dtype=torch.float32)
    batch = te_model.prepare_batch({"input_ids": torch.zeros(2, 16, dtype=torch.long)}, torch.device("cpu"))
    with pytest.raises(te_model.GraphsUnsupportedError, match="need the TE backend.*TorchLlamaDecoderLayer"):
        te_model.capture_decoder_graphs(model, batch)
