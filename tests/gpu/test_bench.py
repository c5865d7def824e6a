"""The bench's CUDA-only paths with the tiny shape, a minute's check before a long GPU run.

What only runs on a GPU with TE: our model on the TE backend against HF from the same weights, the FP8
variants (timed or skipped with TE's reason), and the padded side of the packing bench, a BSHD twin of our
layers that must compute the same loss as our THD model on the same padded rows, and the layer-kernel
bench, whose BSHD and SBHD stacks must compute what the THD stack computes.
"""

from __future__ import annotations

import json

import pytest
import torch

from bench import common, packing, train_step
from te_model.backend import te_unavailable_reason

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(te_unavailable_reason() is not None, reason=f"TE backend: {te_unavailable_reason()}"),
]
TINY_GPU = ["--shape", "tiny", "--device", "cuda", "--dtype", "bf16"]


def test_train_step_on_te(tmp_path):
    out = tmp_path / "train_step.json"
    train_step.main(TINY_GPU + ["--seq", "128", "--batch", "2", "--steps", "3", "--warmup", "2",
                                "--matmul-size", "2048", "--profile-steps", "2", "--gaps", "--out", str(out)])
    rows = {r["variant"]: r for r in json.loads(out.read_text())["variants"]}
    assert rows["ours_bf16"]["label"].startswith("ours TE")
    gpu = rows["ours_bf16"]["gpu"]  # NVML's readings over the timed steps (nvidia-ml-py comes with the host)
    assert gpu["samples"] >= 1 and gpu["sm_clock_mhz"] > 0 and gpu["power_w"] > 0 and gpu["joules_per_step"] > 0
    gaps = rows["ours_bf16"]["profile"]["gaps"]  # the idle time put down to the step's phases
    assert gaps["steps"] == 2 and gaps["per_step_ms"]["compute"] > 0
    assert {row["phase"] for row in gaps["idle"]} <= {"-", "train.batch", "train.forward", "train.backward",
                                                      "train.optimizer"}
    first = rows["hf"]["loss_first"]
    for name, row in rows.items():
        if row.get("skipped"):
            assert name.startswith("fp8_"), row
            continue
        assert row["step_ms"] > 0 and row["peak_mem_gib"] > 0, row
        tolerance = 0.05 if name.startswith("fp8_") else 0.02  # bf16 rounding; FP8 GEMMs on top
        assert abs(row["loss_first"] - first) < tolerance, (name, row["loss_first"], first)
    assert not rows["fp8_delayed"].get("skipped")


def test_a_memory_cap_stops_a_step_that_needs_more(tmp_path):
    """--memory-cap-gib holds the allocator (a smaller GPU on a larger one): a step that needs more is an
    out-of-memory row; the same step under a roomy cap runs."""
    out = tmp_path / "capped.json"
    args = TINY_GPU + ["--seq", "128", "--batch", "2", "--steps", "2", "--warmup", "1", "--matmul-size", "512",
                       "--variants", "ours_bf16"]
    train_step.main(args + ["--memory-cap-gib", "0.001", "--out", str(out)])
    row = json.loads(out.read_text())["variants"][0]
    assert row.get("error", "").startswith("out of memory"), row
    train_step.main(args + ["--memory-cap-gib", "8", "--out", str(out)])  # starts uncapped: the run lifted its cap
    row = json.loads(out.read_text())["variants"][0]
    assert "error" not in row and row["peak_mem_gib"] < 8, row


def test_peers_train_from_the_reference_weights(tmp_path):
    """Each peer installed here runs a few steps and starts from HF's loss; one not installed is skipped."""
    from bench import peers

    out = tmp_path / "peers.json"
    train_step.main(TINY_GPU + ["--seq", "128", "--batch", "2", "--steps", "2", "--warmup", "2", "--matmul-size",
                                "2048", "--variants", "hf," + ",".join(peers.PEERS), "--out", str(out)])
    rows = {r["variant"]: r for r in json.loads(out.read_text())["variants"]}
    first = rows["hf"]["loss_first"]
    for name in peers.PEERS:
        row = rows[name]
        if row.get("skipped"):
            assert "not installed" in row["skipped"], row
            continue
        assert "error" not in row, row
        assert row["step_ms"] > 0 and row["peak_mem_gib"] > 0, row
        tolerance = 0.05 if peers.PEERS[name][1] else 0.02  # bf16 rounding; FP8 GEMMs on top
        assert abs(row["loss_first"] - first) < tolerance, (name, row["loss_first"], first)


def test_bshd_twin_matches_our_thd_model():
    args = packing.parse_args(TINY_GPU + ["--seq", "256", "--batch", "2", "--steps", "2"])
    device = common.setup_device("cuda")
    config = common.llama_config("tiny")
    state = common.reference_state(config, torch.bfloat16, device, seed=0)
    batch = {k: v.to(device) for k, v in packing.padded_batches(packing.make_documents(args, 512), args)[0].items()}
    thd = packing.build_mode("packed", config, state, torch.bfloat16, device, "te")
    bshd = packing.build_mode("padded", config, state, torch.bfloat16, device, "te")
    assert type(bshd.model.layers[0]).__name__ == "LayoutLayer" and bshd.model.layers[0].attn_input_format == "bshd"
    with torch.no_grad():
        expected = float(thd(**batch).loss)  # the padding mask becomes a padding segment in THD
        got = float(packing.padded_bshd_loss(bshd, batch))
    assert got == pytest.approx(expected, abs=0.02)


def test_packing_on_te(tmp_path):
    out = tmp_path / "packing.json"
    packing.main(TINY_GPU + ["--seq", "256", "--batch", "2", "--steps", "3", "--warmup", "1", "--out", str(out)])
    result = json.loads(out.read_text())
    packed, padded = result["modes"]
    assert packed["useful_tokens"] == padded["useful_tokens"] == result["run"]["document_tokens"]
    assert "BSHD" in padded["label"] and "THD" in packed["label"]
    assert result["packed_over_padded"] > 0


def test_attention_host_times_every_case(tmp_path):
    from bench import attention_host

    out = tmp_path / "attention_host.json"
    result = attention_host.main(["--shape", "tiny", "--seq", "256", "--rows", "2,4", "--calls", "4",
                                  "--pad-segments", "512", "--out", str(out)])
    cases = json.loads(out.read_text())["cases"]
    assert len(cases) == 2 * 7 == len(result["cases"])  # per row count: (packed, fixed, padcount) x 2 + plain
    for case in cases:
        assert case["calls"] == 4 and all(ms > 0 for ms in case["fwd_ms"] + case["bwd_ms"]), case
    assert all(c["distinct_keys"] == 1 for c in cases if c["kind"] in ("fixed", "plain"))


@pytest.mark.parametrize("fp8", ["none", "delayed"])
def test_layer_kernels_layouts_compute_the_same_stack(tmp_path, fp8):
    from bench import layer_kernels

    out = tmp_path / "kernels.json"
    result = layer_kernels.main(["--shape", "tiny", "--seq", "256", "--batch", "2", "--steps", "2",
                                 "--warmup", "1", "--fp8", fp8, "--layouts", "thd,bshd,sbhd", "--out", str(out)])
    rows = json.loads(out.read_text())["layouts"]
    assert [r["layout"] for r in rows] == ["thd", "bshd", "sbhd"] == [r["layout"] for r in result["layouts"]]
    for r in rows:
        assert r["step_ms"] > 0 and r["kernel_ms"].get("gemm", 0) > 0 and r["kernel_ms"].get("attention", 0) > 0, r
        # the same weights and input: one causal segment per row is the same attention in every layout
        assert r["max_abs_diff_vs_first"] < (0.05 if fp8 == "delayed" else 0.02), r


def test_layer_kernels_fp8_attention_runs_other_attention_kernels(tmp_path):
    """The -fp8attn layouts run cuDNN's FP8 attention (TE's `fp8_dpa`): other attention kernels than the
    bf16 attention of the same layout, and another, finite output. FP8 attention trains with a head
    dimension of 128 on Hopper, hence the 380M shape."""
    from bench import layer_kernels

    result = layer_kernels.main(["--shape", "llama-380m", "--layers", "1", "--seq", "256", "--batch", "2",
                                 "--steps", "2", "--warmup", "1", "--fp8", "delayed",
                                 "--layouts", "bshd,bshd-fp8attn,sbhd-fp8attn", "--out", str(tmp_path / "k.json")])
    bf16_attn, *fp8_attn = result["layouts"]
    for r in fp8_attn:
        print(f"\n{r['layout']}: {r['attention_kernels']}")
        # cuDNN's FP8 kernels in place of its bf16 ones (helpers such as the seed's extraction are shared)
        assert set(r["attention_kernels"]) - set(bf16_attn["attention_kernels"]), r
        assert set(bf16_attn["attention_kernels"]) - set(r["attention_kernels"]), r
        assert 0 < r["max_abs_diff_vs_first"] < float("inf"), r  # another kernel, a finite output


def test_fp8_transpose_times_every_way_on_every_tensor(tmp_path):
    from bench import fp8_transpose

    out = tmp_path / "transpose.json"
    fp8_transpose.main(["--shape", "tiny", "--tokens", "300", "--tiles", "64x4,32x2", "--reps", "2",
                        "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]  # each way's output was checked against torch's before timing
    ways = {"triton 64x4", "triton 32x2", "TE fp8_transpose", "torch .t().contiguous()"}
    assert {(r["tensor"], r["way"]) for r in rows} == {(t, w) for t in fp8_transpose.tensors("tiny", 300) for w in ways}
    assert all(r["ms"] > 0 and r["tb_per_s"] > 0 for r in rows)


def test_grad_norm_bench_checks_and_times_every_way(tmp_path):
    from bench import grad_norm as bench_grad_norm

    out = tmp_path / "norm.json"
    bench_grad_norm.main(["--shape", "tiny", "--programs", "8192x1x8,1024x3x2", "--reps", "2", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]  # each way's norm was checked against float64's before timing
    assert [r["way"] for r in rows] == ["torch get_total_norm", "kernel 8192x1x8", "kernel 1024x3x2"]
    assert all(r["ms"] > 0 and r["tb_per_s"] > 0 for r in rows)
    assert all(r["relative_error"] < 1e-5 for r in rows[1:])

