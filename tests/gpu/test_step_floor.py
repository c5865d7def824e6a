"""`bench/step_floor.py` on a GPU: its FP8 GEMMs multiply the operands it says (the layouts cuBLAS takes), and
every row times. Needs CUDA only, not Transformer Engine."""

from __future__ import annotations

import pytest
import torch

from bench import common, step_floor

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                                 reason="needs a CUDA GPU with FP8 (compute capability 8.9 or later)")]


def test_step_floor_multiplies_the_operands_it_says_and_times_every_row(monkeypatch, tmp_path):
    # head dimension 64, which every SDPA kernel takes; every GEMM dimension a multiple of 16, as FP8 needs
    monkeypatch.setitem(common.SHAPES, "floor", dict(common.SHAPES["tiny"], hidden_size=256, intermediate_size=512,
                                                     num_attention_heads=4, num_key_value_heads=2))
    floor = step_floor.Floor(common.llama_config("floor"), 2, 128, "fp8", "cudnn", torch.device("cuda"))
    assert floor.fp8
    for ops in (*floor.layers[0], floor.head_operands):
        # forward, data gradient, weight gradient: FP8 in, bf16 out, the product of the FP8 values
        for a, b_t in ((ops.x, ops.w), (ops.dy, ops.wt), (ops.dyt, ops.xt)):
            got, want = floor.mm(a, b_t), a.float() @ b_t.float().t()
            assert got.dtype == torch.bfloat16 and got.shape == want.shape
            assert ((got.float() - want).norm() / want.norm()).item() < 1e-2
    out = tmp_path / "floor.json"
    result = step_floor.main(["--shape", "floor", "--device", "cuda", "--batch", "2", "--seq", "128",
                              "--steps", "3", "--warmup", "1", "--out", str(out)])
    assert result["run"]["gemms"].startswith("FP8") and result["run"]["attention"].startswith("cudnn")
    for row in result["rows"].values():
        assert row["ms"] > 0 and row["tflops"] > 0 and row["gpu"]["power_w"] > 0
