"""The bench scripts on CPU with the tiny shape: they run end to end and their numbers mean what they say.

Speed on CPU says nothing, so these tests check what would make a GPU run worthless: the JSON fields are
there and finite, every variant starts from the same weights and sees the same batches (in fp32 the first
losses of HF and our model agree to rounding), the FLOP count matches the model's real parameter count,
both packing modes carry exactly the same documents, and the Ray job and the bare loop run the same step.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os

import numpy as np
import pytest
import torch

from bench import common, kernel_kinds, packing, peers, ray_overhead, train_step
from pipeline.train import optim
from te_model.layer import TorchLlamaDecoderLayer
from transformers.models.llama import modeling_llama

TINY = ["--shape", "tiny", "--device", "cpu", "--dtype", "fp32"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: the tiny matmuls gain nothing from two, and lose a lot on a shared machine."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def finite_positive(row: dict, *keys: str) -> None:
    for key in keys:
        value = row[key]
        assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, f"{key}={value!r} in {row}"


# ---------------------------------------------------------------------------------------------------
# train_step


def test_the_bench_scripts_run_as_their_docstrings_say_from_the_repository_root():
    """`python bench/X.py` puts bench/ first on the path: no module there may take the name of a package
    transformers looks for (a bench module named `kernels` is taken for HF's kernels hub, and fails)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for script in ("train_step.py", "layer_kernels.py", "fp8_cache_host.py"):
        done = subprocess.run([sys.executable, f"bench/{script}", "--help"], cwd=root, env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0 and done.stdout.startswith("usage:"), (script, done.stderr[-2000:])


@pytest.fixture(scope="module")
def train_step_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "train_step.json"
    argv = TINY + ["--seq", "64", "--batch", "2", "--steps", "2", "--warmup", "1", "--matmul-size", "128",
                   "--variants", "hf,hf_compile,ours_bf16,fp8_delayed,fp8_block," + ",".join(peers.PEERS),
                   "--compile-backend", "aot_eager", "--update-launch", "8192x16",
                   "--profile-steps", "2", "--kernels-top", "4", "--out", str(out)]
    train_step.main(argv)
    return json.loads(out.read_text())


def test_train_step_reports_every_variant(train_step_result):
    run, rows = train_step_result["run"], {r["variant"]: r for r in train_step_result["variants"]}
    assert run["ours_backend"] == "torch" and run["ours_backend_reason"]
    # the run's update program size is recorded, and the pipeline's is left as it was
    assert run["update_launch"] == "8192x16" and (optim.BLOCK, optim.WARPS) == (4096, 8)
    finite_positive(run, "model_flops_per_step", "matmul_peak_tflops", "tokens_per_step")
    for name in ("hf", "hf_compile", "ours_bf16"):
        finite_positive(rows[name], "step_ms", "wall_ms_mean", "tokens_per_s", "model_tflops", "mfu_datasheet",
                        "mfu_measured_peak", "speedup_vs_hf", "loss_first", "loss_last")
        assert rows[name]["tokens_per_s"] == pytest.approx(run["tokens_per_step"] / rows[name]["step_ms"] * 1e3)
    assert rows["hf"]["speedup_vs_hf"] == 1.0
    assert "torch backend" in rows["ours_bf16"]["label"]
    assert not any("gpu" in r for r in rows.values())  # no clock or power readings off CUDA
    assert train_step_result["environment"]["host_cpu"].endswith(f"{os.cpu_count()} logical cores")
    for name in ("fp8_delayed", "fp8_block"):
        assert "step_ms" not in rows[name] and "Transformer Engine" in rows[name]["skipped"]
    for name in peers.PEERS:  # every peer needs CUDA; none ran, so no row has a ratio to the fastest one
        assert rows[name]["skipped"] == f"{name} runs on CUDA only (device is cpu)", rows[name]
    assert all(r.get("speedup_vs_fastest_peer") is None for r in rows.values())


def test_peers_run_only_when_named():
    assert not set(peers.PEERS) & set(train_step.parse_args([]).variants)
    assert set(peers.PEERS) <= set(train_step.VARIANTS) and set(peers.PEERS) == set(peers.BUILDERS)


def test_peer_skip_reasons_name_what_is_missing():
    everything = lambda package: True  # noqa: E731
    for name in peers.PEERS:
        assert peers.skip_reason(name, "cuda", (9, 0), everything) is None, name
    assert peers.skip_reason("hf_liger", "cuda", (9, 0), lambda p: False) == \
        "liger_kernel not installed (see bench/gpu/peer-requirements.txt)"
    assert peers.skip_reason("accelerate_te_fp8", "cuda", (9, 0), lambda p: p != "transformer_engine") == \
        "transformer_engine not installed (see bench/gpu/peer-requirements.txt)"
    for name in ("hf_torchao_fp8", "accelerate_te_fp8", "te_llama_swap"):  # FP8 tensor cores: Ada, Hopper, ...
        assert peers.skip_reason(name, "cuda", (8, 0), everything) == \
            "FP8 needs compute capability 8.9+, this GPU has 8.0"
        assert peers.skip_reason(name, "cuda", (8, 9), everything) is None
    assert peers.skip_reason("hf_liger", "cuda", (8, 0), everything) is None  # Liger's Triton runs on an A100


def test_ratios_are_against_hf_and_the_fastest_peer():
    rows = [{"variant": v, "loss_first": 1.0, "step_ms": ms} for v, ms in
            (("hf", 100.0), ("hf_liger", 80.0), ("te_llama_swap", 60.0), ("fp8_delayed", 40.0))]
    rows.append({"variant": "hf_torchao_fp8", "error": "out of memory"})  # no time: not a candidate
    train_step.add_rates(rows, flops=1e12, tokens=1000, matmul_peak=1e15)
    by = {r["variant"]: r for r in rows}
    assert train_step.fastest_peer(rows)["variant"] == "te_llama_swap"
    assert by["fp8_delayed"]["speedup_vs_fastest_peer"] == pytest.approx(1.5)
    assert by["fp8_delayed"]["speedup_vs_hf"] == pytest.approx(2.5)
    assert by["hf_liger"]["speedup_vs_fastest_peer"] == pytest.approx(0.75)
    assert by["fp8_delayed"]["model_tflops"] == pytest.approx(25.0)


def test_a_memory_cap_needs_a_cuda_device(capsys):
    with pytest.raises(SystemExit):
        train_step.parse_args(TINY + ["--memory-cap-gib", "78.5"])
    assert "--memory-cap-gib needs --device cuda" in capsys.readouterr().err


def test_a_memory_cap_is_a_fraction_of_the_device_it_names_and_is_lifted_after(monkeypatch):
    """torch takes the fraction for a device index; `--device cuda` names none, so the current one is meant.
    The cap is the process's: lifted when the run ends, or the next run in the process (a test's second
    `main`) would start under it. The allocator's cache is emptied before the cap is set: torch checks the cap
    only when it asks CUDA for memory, so blocks it had cached would serve the run beyond it."""
    from torch.cuda._utils import _get_device_index

    set_fractions = []
    monkeypatch.setattr(train_step.common, "free_memory", lambda: set_fractions.append("emptied"))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: type("P", (), {"total_memory": 80 * 2**30}))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction",
                        lambda fraction, device: set_fractions.append((fraction, _get_device_index(device))))
    with train_step.capped_memory(torch.device("cuda"), 60.0):
        assert set_fractions == ["emptied", (0.75, 1)]
    with pytest.raises(RuntimeError, match="a variant failed"):
        with train_step.capped_memory(torch.device("cuda:0"), 20.0):
            raise RuntimeError("a variant failed")
    assert set_fractions == ["emptied", (0.75, 1), (1.0, 1), "emptied", (0.25, 0), (1.0, 0)]
    with pytest.raises(SystemExit, match="the GPU has only 80.0 GiB"):
        with train_step.capped_memory(torch.device("cuda"), 81.0):
            pass
    with train_step.capped_memory(torch.device("cuda"), None):
        pass
    assert len(set_fractions) == 6


def test_a_failing_peer_is_reported_and_the_run_goes_on(tmp_path, monkeypatch):
    # Let the swap run on CPU: building it imports Transformer Engine, which is not installed here.
    monkeypatch.setattr(peers, "unavailable_reason", lambda name, device: None)
    out = tmp_path / "failing.json"
    train_step.main(TINY + ["--seq", "32", "--batch", "2", "--steps", "1", "--warmup", "0", "--matmul-size", "64",
                            "--variants", "te_llama_swap,hf", "--out", str(out)])
    rows = {r["variant"]: r for r in json.loads(out.read_text())["variants"]}
    assert rows["te_llama_swap"]["error"].startswith("failed: ModuleNotFoundError"), rows["te_llama_swap"]
    finite_positive(rows["hf"], "step_ms", "loss_first")
    assert modeling_llama.LlamaDecoderLayer.__name__ == "LlamaDecoderLayer"


def test_te_llama_swap_maps_hf_weights_and_keeps_hf_loss_on_the_cpu_twin():
    """The swap's wiring through the torch twin of TE's TransformerLayer (same parameter names): HF's
    model with its decoder class swapped, loaded through te_model's key table, computes HF's logits and loss."""
    config = common.llama_config("tiny")
    state = common.reference_state(config, torch.float32, torch.device("cpu"), seed=0)
    hf = common.build_hf(config, torch.float32, torch.device("cpu"))
    hf.load_state_dict(state, strict=True)
    swap = peers.swapped_llama(config, state, torch.float32, torch.device("cpu"), TorchLlamaDecoderLayer)
    assert all(type(layer) is TorchLlamaDecoderLayer for layer in swap.model.layers)
    assert modeling_llama.LlamaDecoderLayer.__name__ == "LlamaDecoderLayer"  # the swap was undone
    ids = torch.randint(0, config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = hf(input_ids=ids, labels=ids), swap(input_ids=ids, labels=ids)
    err = (got.logits - want.logits).abs()
    assert err.max() < 1e-4, f"logits differ: max {err.max():.2e}, mean {err.mean():.2e}"
    assert float(got.loss) == pytest.approx(float(want.loss), abs=1e-5)
    del state["model.layers.0.self_attn.k_proj.weight"]
    with pytest.raises(ValueError, match="unset"):
        peers.swapped_llama(config, state, torch.float32, torch.device("cpu"), TorchLlamaDecoderLayer)


def test_train_step_variants_start_from_the_same_weights(train_step_result):
    rows = {r["variant"]: r for r in train_step_result["variants"]}
    first = rows["hf"]["loss_first"]
    assert abs(first - math.log(512)) < 0.5  # a random model over the tiny vocabulary
    for name in ("hf_compile", "ours_bf16"):
        assert rows[name]["loss_first"] == pytest.approx(first, abs=1e-5), name
        assert rows[name]["loss_first_diff_vs_hf"] == pytest.approx(rows[name]["loss_first"] - first)
    # the same batches and the same updates: still equal after the optimizer steps
    assert rows["ours_bf16"]["loss_last"] == pytest.approx(rows["hf"]["loss_last"], abs=1e-4)
    assert rows["hf"]["loss_last"] != pytest.approx(first, abs=1e-6)  # the steps did train


def test_train_step_profiles_say_where_each_step_goes(train_step_result, capsys):
    rows = {r["variant"]: r for r in train_step_result["variants"]}
    for name in ("hf", "ours_bf16"):
        profile = rows[name]["profile"]
        assert profile["steps"] == 2 and 0 <= profile["idle_ms"] < profile["wall_ms"]
        by_kind = profile["kernel_ms"]
        for kind in ("gemm", "attention", "optimizer", "loss", "embedding"):
            assert by_kind.get(kind, 0) > 0, (name, kind, by_kind)
        assert "gemm fp8" not in by_kind  # no FP8 on this path
        top = [ms for _, ms, _ in profile["kernels_top"]]
        assert len(top) == 4 and top == sorted(top, reverse=True)  # --kernels-top: the 4 largest, largest first
    assert "profile" not in rows["fp8_delayed"]  # skipped variants have nothing to profile


@pytest.mark.parametrize("name, kind", [
    ("nvjet_sm90_qrtst_128x160_128x5_2x1_v_bz_coopA_algo2_TNT", "gemm fp8"),
    ("nvjet_sm90_qqtst_256x128_128x4_1x2_h_bz_coopA_TNT", "gemm fp8"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64", "gemm"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26_64x64x128_1x4x1_cga1x1", "attention"),
    ("cast_transpose_optimized_kernel(__nv_bfloat16 const*, float const*, __nv_fp8_e4m3*)", "cast/transpose/amax"),
    ("adamw_update", "optimizer"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>", "optimizer"),
    ("ce_rows", "loss"),
    ("void at::native::indexSelectLargeIndex<c10::BFloat16, long, unsigned int, 2, 2, -2, true>", "embedding"),
    ("void transformer_engine::dgated_act_kernel<16, true, float>", "swiglu"),
    ("void at::native::vectorized_elementwise_kernel<8, at::native::FillFunctor<float>>", "other"),
])
def test_kernels_are_sorted_into_kinds_by_name(name, kind):
    assert kernel_kinds.kind_of(name) == kind


def test_micro_batches_accumulate_to_the_whole_batch(tmp_path):
    """Two micro-batches of one row train as one step of the same two rows: same losses, twice the tokens."""
    one, two = train_step.token_batches(512, 1, 32, 2, seed=0), train_step.token_batches(512, 2, 32, 1, seed=0)
    assert torch.equal(torch.cat(one), two[0])  # the same tokens either way
    results = {}
    for batch, micro in ((2, 1), (1, 2)):
        out = tmp_path / f"{batch}x{micro}.json"
        train_step.main(TINY + ["--seq", "32", "--batch", str(batch), "--micro-batches", str(micro), "--steps", "2",
                                "--warmup", "0", "--matmul-size", "64", "--variants", "hf,ours_bf16",
                                "--out", str(out)])
        results[micro] = json.loads(out.read_text())
    assert results[2]["run"]["tokens_per_step"] == results[1]["run"]["tokens_per_step"] == 64
    assert results[2]["run"]["model_flops_per_step"] == results[1]["run"]["model_flops_per_step"]
    for whole, accumulated in zip(results[1]["variants"], results[2]["variants"]):
        for key in ("loss_first", "loss_last"):
            assert accumulated[key] == pytest.approx(whole[key], abs=1e-5), (whole["variant"], key)


@pytest.mark.parametrize("name,micro_batches,keeps", [
    ("fp8_delayed_fp8head_fastacc", 4, True),  # the pipeline's default under accumulation
    ("fp8_delayed_fp8head_fastacc_graphs", 4, True),
    ("fp8_delayed_fp8head_fastacc_fp8_from_update", 4, True),  # (then every forward reuses the update's)
    ("fp8_delayed_fp8head_fastacc", 1, False),  # no accumulation: nothing to reuse
    ("fp8_delayed_fp8head_fastacc_recast", 4, False),
    ("fp8_delayed_fp8head_recast_graphs", 4, False),
    ("fp8_delayed_fp8head_bwdcast", 4, False),  # `train.recast_fp8_weights` keeps none
    ("ours_bf16", 4, False),
    ("hf", 4, False),
])
def test_train_step_keeps_fp8_weights_as_the_pipeline_does(name, micro_batches, keeps):
    """The eager and graphed variants keep a step's FP8 weights across its micro-batches where the pipeline's
    loop does, so a bench row with `--micro-batches` measures what a job with `train.grad_accum_steps` runs."""
    assert train_step.keeps_fp8_weights(name, micro_batches) is keeps


def test_model_flops_counts_the_real_parameters():
    config = common.llama_config("tiny")
    state = common.reference_state(config, torch.float32, torch.device("cpu"), seed=0)
    model = common.build_hf(config, torch.float32, torch.device("cpu"))
    non_embedding = sum(p.numel() for p in model.parameters()) - config.vocab_size * config.hidden_size
    batch, seq = 2, 64
    attention = 6 * config.num_hidden_layers * batch * seq**2 * config.hidden_size
    assert train_step.model_flops(state, config, batch, seq) == 6 * non_embedding * batch * seq + attention


def test_load_hf_state_refuses_missing_weights():
    config = common.llama_config("tiny")
    state = common.reference_state(config, torch.float32, torch.device("cpu"), seed=0)
    model = train_step.te_model.build_model(config, backend="torch", dtype=torch.float32, device="cpu")
    del state["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match="unset"):
        common.load_hf_state(model, state)


# ---------------------------------------------------------------------------------------------------
# packing


def test_length_mix_is_the_skewed_one():
    lengths = packing.document_lengths(20000, 4096, seed=0)
    assert lengths.min() >= 64 and lengths.max() <= 4096
    shares = [np.mean(lengths <= 256), np.mean((lengths > 256) & (lengths <= 1024)), np.mean(lengths > 1024)]
    assert shares == pytest.approx([0.70, 0.25, 0.05], abs=0.015)


def test_packing_compares_the_same_documents(tmp_path):
    out = tmp_path / "packing.json"
    packing.main(TINY + ["--seq", "256", "--batch", "2", "--steps", "3", "--warmup", "1", "--out", str(out)])
    result = json.loads(out.read_text())
    packed, padded = result["modes"]
    assert (packed["mode"], padded["mode"]) == ("packed", "padded")
    for mode in (packed, padded):
        finite_positive(mode, "useful_tokens_per_s", "time_s", "step_ms_median", "steps", "loss_first")
        assert mode["useful_tokens"] == result["run"]["document_tokens"]  # every document, once, no padding
    assert packed["padding_fraction"] < 0.2 < padded["padding_fraction"]
    assert padded["slot_tokens"] > packed["slot_tokens"]
    ratio = packed["useful_tokens_per_s"] / padded["useful_tokens_per_s"]
    assert result["packed_over_padded"] == pytest.approx(ratio)


# ---------------------------------------------------------------------------------------------------
# ray_overhead


def test_ray_job_and_bare_loop_run_the_same_step(ray_cluster, tmp_path):
    out = tmp_path / "ray.json"
    ray_overhead.main(TINY + ["--seq", "128", "--batch", "2", "--steps", "3", "--warmup", "1",
                              "--workdir", str(tmp_path / "work"), "--out", str(out)])
    result = json.loads(out.read_text())
    for side in ("bare", "ray"):
        finite_positive(result[side], "step_ms_median", "step_ms_mean", "step_ms_min", "loss_first")
        assert result[side]["steps_timed"] == 3
    # same weights, rows and step on both sides, fp32 on CPU: the same losses
    assert result["ray"]["loss_first"] == pytest.approx(result["bare"]["loss_first"], abs=1e-6)
    assert result["ray"]["loss_last"] == pytest.approx(result["bare"]["loss_last"], abs=1e-5)
    finite_positive(result, "ray_over_bare")


# ---------------------------------------------------------------------------------------------------
# matrix: the one-call runner


def test_matrix_runs_jobs_reports_and_stops_overruns(tmp_path, monkeypatch, capsys):
    from bench import matrix

    tiny_step = ["--shape", "tiny", "--device", "cpu", "--dtype", "fp32", "--seq", "64", "--batch", "2",
                 "--steps", "1", "--warmup", "0", "--matmul-size", "64", "--variants", "hf,ours_bf16,fp8_delayed"]
    monkeypatch.setattr(matrix, "JOBS", {
        "ts-1b-2048": ("train_step", tiny_step, 20),
        "ts-8b-4096": ("train_step", tiny_step + ["--steps", "100000"], 30),  # cannot finish in any budget
    })
    # A budget no loaded machine exhausts on the tiny job; then one the endless job is stopped at.
    args = matrix.parse_args(["--gpus", "1", "--budget-s", "900", "--only", "ts-1b-2048", "--out", str(tmp_path)])
    status = matrix.run_jobs(args)
    monkeypatch.setattr(matrix, "MIN_START_S", 1.0)
    endless = matrix.parse_args(["--gpus", "1", "--budget-s", "5", "--only", "ts-8b-4096", "--out", str(tmp_path)])
    status.update(matrix.run_jobs(endless))
    assert status["ts-1b-2048"].startswith("exit 0"), status
    assert status["ts-8b-4096"].startswith("stopped: budget spent"), status
    matrix.report(args, status)  # the goals of the job run, not of every job
    printed = capsys.readouterr().out
    assert "MISS ts-1b-2048: FP8 delayed tokens/s over HF bf16 >= 1.6: not measured" in printed
    assert "ts-8b-4096:" not in printed.split("Goals of the jobs run")[1].split("Jobs:")[0]
    args.only = list(matrix.JOBS)
    matrix.report(args, status)
    printed = capsys.readouterr().out
    assert "HF LlamaForCausalLM sdpa fp32" in printed  # the finished job's table
    assert "MISS ts-8b-4096: FP8 delayed tokens/s over HF bf16 >= 1.7: not measured" in printed
    goals = matrix.goal_lines(tmp_path)
    # FP8 cannot run on CPU: every goal is reported as missed and not measured, none as met
    assert goals and all(line.startswith("MISS") and "not measured" in line for line in goals), goals


def test_peer_jobs_run_hf_the_peers_and_ours_at_the_three_shapes_only_when_named():
    from bench import matrix

    shapes = set()
    for name, (script, job_args, _) in matrix.PEER_JOBS.items():
        args = train_step.parse_args(job_args)  # refuses an unknown variant or shape
        assert script == "train_step" and args.master_weights == "bf16_kahan", name
        ours = ["ours_bf16", "fp8_delayed", "fp8_delayed_fp8head", "fp8_delayed_fp8head_fastacc",
                "fp8_delayed_fp8head_inline", "fp8_delayed_recompute_mlp", "fp8_delayed_fp8head_recompute_mlp"]
        if name != "peers-8b-4096":  # the short steps: also with CUDA graphs
            ours += ["ours_bf16_graphs", "fp8_delayed_graphs", "fp8_delayed_fp8head_graphs",
                     "fp8_delayed_fp8head_fastacc_graphs", "fp8_delayed_fp8head_inline_graphs"]
        if name != "peers-8b-256":  # also holding less (FP8 weights cast again in backward, FP8 moments, 1-byte Kahan)
            ours += ["fp8_delayed_fp8head_bwdcast_moments_fp8_kahan8",
                     "fp8_delayed_fp8head_bwdcast_moments_fp8_fastacc_kahan8"]
        assert args.variants == ["hf", *peers.PEERS, *ours], name
        shapes.add((args.shape, args.layers, args.batch, args.seq))
    assert shapes == {("llama3.1-8b", 32, 2, 4096), ("llama3.2-1b", 16, 4, 2048), ("llama3.1-8b", 32, 8, 256)}
    assert matrix.PEERS == tuple(peers.PEERS)
    assert not set(matrix.PEER_JOBS) & set(matrix.parse_args(["--out", "x"]).only)


def test_parallel_profile_backend_choice_is_checked():
    from bench import parallel_profile

    common_args = ["--shape", "tiny", "--device", "cpu", "--dtype", "fp32", "--layouts", "1"]
    with pytest.raises(SystemExit, match="--backend torch runs without FP8"):
        parallel_profile.main([*common_args, "--backend", "torch", "--fp8", "delayed"])
    with pytest.raises(SystemExit, match="--backend te: Transformer Engine cannot run here"):
        parallel_profile.main([*common_args, "--backend", "te"])
    assert parallel_profile.parse_args(["--train", "fp8_head=true", "--train", "warmup_steps=7"]).train == \
        {"fp8_head": True, "warmup_steps": 7}
    with pytest.raises(SystemExit):
        parallel_profile.parse_args(["--train", "fp8_head"])


def test_host_breakdown_counts_only_what_runs_inside_the_named_operator(tmp_path):
    from bench.trace_gaps import chrome_trace, host_breakdown

    def inner(x):
        return (x @ x).sum()

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], with_stack=True) as prof:
        with torch.profiler.record_function("outer_range"):
            inner(torch.ones(64, 64))
        torch.ones(8).exp()  # outside the range: must not be counted
    trace_path = tmp_path / "trace.json"
    trace = chrome_trace(prof, trace_path)  # kept at the path
    assert json.loads(trace_path.read_text()) == trace
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as again:
        torch.ones(8).exp()
    assert any(e.get("name") == "aten::exp" for e in chrome_trace(again)["traceEvents"])  # no path: a temporary file
    rows = host_breakdown(trace, "outer_range", top=100)
    names = {row["name"] for row in rows}
    assert "aten::mm" in names and any("inner" in name for name in names), names
    assert "aten::exp" not in names and "outer_range" not in names
    outer = next(e for e in trace["traceEvents"] if e.get("name") == "outer_range" and e.get("ph") == "X")
    assert 0 < sum(row["self_us"] for row in rows) <= outer["dur"]


def test_host_breakdown_counts_a_call_that_outlives_the_operator_only_up_to_its_end():
    """A call that starts inside the operator and ends after it (a thread descheduled as the Python frame
    leaves the `record_function` block) counts only its time inside; nothing outside counts."""
    from bench.trace_gaps import host_breakdown

    def event(name, ts, dur, cat="python_function"):
        return {"name": name, "ph": "X", "ts": ts, "dur": dur, "cat": cat, "pid": 1, "tid": 1}

    trace = {"traceEvents": [
        event("test.py(1): body", 0, 1000),  # the caller, outside the operator
        event("outer_range", 100, 300, cat="user_annotation"),
        event("aten::mm", 120, 100, cat="cpu_op"),
        event("profiler.py(2): __exit__", 350, 400),  # ends 350 us after the operator
        event("aten::exp", 800, 50, cat="cpu_op"),  # after it
    ]}
    rows = {row["name"]: row["self_us"] for row in host_breakdown(trace, "outer_range")}
    assert rows == {"aten::mm": 100, "profiler.py(2): __exit__": 50}


def test_attention_host_cases_are_what_they_say_and_cpu_is_refused():
    from bench import attention_host

    cpu = torch.device("cpu")
    packed = attention_host.case_plans("packed", "plan", 16, 1024, 20, 0, cpu)
    assert len(packed) == 20 and len({attention_host.plan_key(p) for p in packed}) > 1  # batches differ
    fixed = attention_host.case_plans("fixed", "row", 16, 1024, 5, 0, cpu)
    assert {attention_host.plan_key(p) for p in fixed} == {attention_host.plan_key(packed[0])[:1] + (1024,)}
    padded = attention_host.case_plans("padcount", "plan", 16, 1024, 20, 0, cpu, pad_segments=1024)
    assert {len(p.cu_seqlens) for p in padded} == {1025}
    assert all(torch.equal(p.cu_seqlens[: len(q.cu_seqlens)], q.cu_seqlens) for p, q in zip(padded, packed))
    plain = attention_host.case_plans("plain", "plan", 4, 256, 3, 0, cpu)
    assert all(p.one_segment_per_row and len(p.cu_seqlens) == 5 for p in plain)
    with pytest.raises(SystemExit, match="needs Transformer Engine on CUDA"):
        attention_host.main(["--calls", "2"])


def test_gpu_work_leaves_out_annotation_ranges():
    from types import SimpleNamespace

    from bench.trace_gaps import gpu_work

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    kernel = SimpleNamespace(name="nvjet_gemm", device_type=cuda, is_user_annotation=False)
    annotation = SimpleNamespace(name="DistributedDataParallel.forward", device_type=cuda, is_user_annotation=True)
    host_op = SimpleNamespace(name="aten::mm", device_type=cpu, is_user_annotation=False)
    assert gpu_work([kernel, annotation, host_op]) == [kernel]


def test_trace_gaps_splits_a_step_into_compute_nccl_and_idle_and_names_what_the_host_did():
    from bench import trace_gaps

    def x(cat, name, ts, dur, pid=1, tid=1, **args):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": pid, "tid": tid, "args": args}

    host = [x("user_annotation", "bench.step", 0, 1000), x("user_annotation", "train.batch", 0, 100),
            x("user_annotation", "train.forward", 100, 500),
            x("cpu_op", "aten::copy_", 10, 50), x("cpu_op", "aten::nonzero", 110, 40),
            x("cuda_runtime", "cudaStreamSynchronize", 120, 30),
            x("cpu_op", "_Linear", 200, 100), x("cuda_runtime", "cudaLaunchKernel", 210, 5, correlation=1),
            x("cpu_op", "_Linear", 300, 10), x("cuda_runtime", "cudaLaunchKernel", 301, 4, correlation=2),
            x("cpu_op", "_Linear", 315, 15), x("cuda_runtime", "cudaLaunchKernel", 320, 5, correlation=3),
            x("cpu_op", "aten::add", 150, 10, tid=2)]  # another thread's operator: not the launching one
    gpu = [x("kernel", "gemm", 220, 280, pid=0, tid=7, correlation=1),
           x("kernel", "gemm", 505, 395, pid=0, tid=7, correlation=2),  # 5 us after the last: GPU scheduling
           x("kernel", "ncclDevKernel_AllReduce", 920, 20, pid=0, tid=20, correlation=9),
           x("kernel", "gemm", 950, 30, pid=0, tid=7, correlation=3)]  # queued at 320, starts after a gap
    result = trace_gaps.analyse({"traceEvents": host + gpu}, "bench.step")
    ms = {k: round(v * 1e3, 6) for k, v in result["per_step_ms"].items()}  # back to microseconds
    assert ms == {"step": 1000, "compute": 705, "nccl_only": 20, "idle": 275, "starved": 240, "queued": 50,
                  "short": 5, "after": 0}
    assert "the host ran ahead" not in trace_gaps.format_report("one", result)
    idle = {(r["phase"], r["host"]): round(r["ms"] * 1e3, 6) for r in result["idle"]}
    assert idle == {("train.batch", "aten::copy_"): 50, ("train.batch", "(python)"): 50,
                    ("train.forward", "aten::nonzero"): 40, ("train.forward", "(python)"): 60,
                    ("train.forward", "_Linear"): 20, ("-", f"{trace_gaps.QUEUED} _Linear"): 50,
                    ("-", "(python)"): 20}
    assert [(r["phase"], r["op"], r["calls"], round(r["ms"] * 1e3, 6)) for r in result["syncs"]] == [
        ("train.forward", "aten::nonzero", 1, 30)]
    assert "starved by the host 0.2" in trace_gaps.format_report("ddp", result)
    # the host queues the step and goes on: the GPU computes 400 us past the host's range
    late = [x("kernel", "gemm", 220, 1180, pid=0, tid=7, correlation=1)]
    ahead = trace_gaps.analyse({"traceEvents": host + late}, "bench.step")
    assert round(ahead["per_step_ms"]["after"] * 1e3, 6) == 400
    assert "the host ran ahead: the GPU computed 0.4 ms a step more" in trace_gaps.format_report("one", ahead)


def test_peer_goals_compare_ours_with_hf_the_fastest_and_the_leanest_peer(tmp_path):
    from bench import matrix

    def row(variant, ms, gib):
        return {"variant": variant, "step_ms": ms, "peak_mem_gib": gib, "speedup_vs_hf": 100.0 / ms,
                "speedup_vs_fastest_peer": 70.0 / ms, "model_tflops": 50_000 / ms}

    rows = [row("hf", 100.0, 50.0), row("hf_liger", 90.0, 40.0), row("hf_torchao_fp8", 70.0, 45.0),
            row("ours_bf16", 62.0, 47.0), row("fp8_delayed", 50.0, 48.0), row("fp8_delayed_recompute_mlp", 65.0, 39.0)]
    for name in ("peers-8b-4096", "peers-8b-256"):
        (tmp_path / f"{name}.json").write_text(json.dumps({"variants": rows}))
    lines = matrix.goal_lines(tmp_path)
    for line in ("MET  peers-8b-4096: FP8 delayed over HF bf16 >= 2.0: 2.0",
                 "MET  peers-8b-4096: FP8 delayed over the fastest peer >= 1.35: 1.4",
                 "MET  peers-8b-4096: FP8 delayed model TFLOP/s >= 900: 1000.0",
                 "MISS peers-8b-4096: FP8 delayed peak GiB <= the leanest peer's (ours, peer): (48.0, 40.0)",
                 "MISS peers-8b-4096: FP8 delayed, MLP recomputed over HF bf16 >= 2.0: 1.538",
                 "MET  peers-8b-4096: FP8 delayed, MLP recomputed peak GiB <= the leanest peer's (ours, peer): "
                 "(39.0, 40.0)",
                 "MISS peers-8b-4096: FP8 delayed + FP8 head over HF bf16 >= 2.0: not measured",
                 "MET  peers-8b-256: FP8 delayed over our bf16 >= 1.2: 1.24",
                 "MISS peers-1b-2048: FP8 delayed over HF bf16 >= 2.0: not measured"):
        assert line in lines, line


# ---------------------------------------------------------------------------------------------------
# step_floor


def test_step_floor_runs_the_models_gemms_and_attention_and_nothing_else(monkeypatch, tmp_path):
    from bench import step_floor

    config = common.llama_config("tiny")
    batch, seq = 2, 64
    tokens = batch * seq
    products = []
    real_mm = step_floor.Floor.mm

    def counted(self, a, b_t):
        out = real_mm(self, a, b_t)
        assert torch.allclose(out, a @ b_t.t())
        products.append((a.shape[0], b_t.shape[0], a.shape[1]))  # (rows, columns, inner)
        return out

    monkeypatch.setattr(step_floor.Floor, "mm", counted)
    out = tmp_path / "floor.json"
    result = step_floor.main(["--shape", "tiny", "--device", "cpu", "--batch", str(batch), "--seq", str(seq),
                              "--steps", "2", "--warmup", "1", "--out", str(out)])
    assert json.loads(out.read_text())["rows"].keys() == {"gemms", "attention", "both"}
    for row in result["rows"].values():
        finite_positive(row, "ms", "tflops")

    # one step's products are the forward, data-gradient and weight-gradient GEMMs of every linear layer
    # of HF's model (Q, K, V as one, gate and up as one), the head's included
    model = common.build_hf(config, torch.float32, torch.device("cpu"))
    weights = {name: m.weight.shape for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    layer0 = {k.split("layers.0.")[1]: v for k, v in weights.items() if "layers.0." in k}
    fused = {"qkv": (sum(layer0[f"self_attn.{p}_proj"][0] for p in "qkv"), config.hidden_size),
             "proj": layer0["self_attn.o_proj"], "fc1": (2 * layer0["mlp.up_proj"][0], config.hidden_size),
             "fc2": layer0["mlp.down_proj"]}
    expected = []
    for out_f, in_f in [*fused.values()] * config.num_hidden_layers + [weights["lm_head"]]:
        expected += [(tokens, out_f, in_f), (tokens, in_f, out_f), (out_f, in_f, tokens)]
    per_step = len(expected)
    steps = 1 + 2  # warm-up and timed steps, in each of the two rows with GEMMs
    assert len(products) == 2 * steps * per_step
    assert sorted(products[:per_step]) == sorted(expected)
    linear = sum(o * i for o, i in fused.values()) * config.num_hidden_layers + config.vocab_size * config.hidden_size
    assert result["run"]["flops"]["gemms"] == 6 * tokens * linear
    assert result["run"]["flops"]["attention"] == 6 * config.num_hidden_layers * batch * seq**2 * config.hidden_size


def test_step_floor_counts_the_memory_its_operands_take_and_stops_in_one_line_when_they_cannot_fit():
    from bench import step_floor

    config = common.llama_config("tiny")
    floor = step_floor.Floor(config, 2, 64, "fp8", "cudnn", torch.device("cpu"))  # fp32 on the CPU
    held = [t for ops in [*sum(floor.layers, []), floor.head_operands]
            for t in (ops.w, ops.wt, ops.x, ops.xt, ops.dy, ops.dyt)] + [*floor.qkv, floor.grad_out]
    assert step_floor.operand_bytes(config, 2, 64, 4, 4) == sum(t.numel() * t.element_size() for t in held)

    # the 8B model's 32 layers at 2 x 4096: about 100 GiB in bf16 (more than an 80 GB GPU), half that in FP8
    eight = common.llama_config("llama3.1-8b", 32)
    bf16, fp8 = (step_floor.operand_bytes(eight, 2, 4096, size, 2) / 2**30 for size in (2, 1))
    assert 95 < bf16 < 110 and 45 < fp8 < 55
    step_floor.check_fits(int(fp8 * 2**30), 78 * 2**30, 32, "H100")
    with pytest.raises(SystemExit) as stop:
        step_floor.check_fits(int(bf16 * 2**30), 78 * 2**30, 32, "H100")
    message = str(stop.value)
    assert message.startswith("step_floor: the operands of 32 layers need 10") and "78.0 GiB free" in message


def test_goal_budget_says_what_each_goal_leaves_beyond_the_floor(train_step_result, tmp_path, capsys):
    from bench import goal_budget, step_floor

    run = train_step_result["run"]
    floor_out, steps_out = tmp_path / "floor.json", tmp_path / "steps.json"
    step_floor.main(["--shape", "tiny", "--device", "cpu", "--batch", str(run["batch"]), "--seq", str(run["seq"]),
                     "--steps", "1", "--warmup", "0", "--out", str(floor_out)])
    floor = json.loads(floor_out.read_text())
    floor_ms = floor["rows"]["both"]["ms"]
    # the peers skip on the CPU: two of them are given the times of a GPU run's order (the swap the faster)
    steps = json.loads(json.dumps(train_step_result))
    rows = {r["variant"]: r for r in steps["variants"]}
    hf_ms = rows["hf"]["step_ms"]
    for name, share in (("hf_liger", 0.9), ("te_llama_swap", 0.6)):
        rows[name].update(step_ms=hf_ms * share, skipped=None)
    steps_out.write_text(json.dumps(steps))
    capsys.readouterr()

    argv = ["--floor", str(floor_out), "--steps", str(steps_out), "--ours", "ours_bf16"]
    account = goal_budget.main(argv)
    printed = capsys.readouterr().out
    assert account["rows"]["peer"]["label"] == rows["te_llama_swap"]["label"]
    assert account["rows"]["ours"]["beyond_ms"] == pytest.approx(rows["ours_bf16"]["step_ms"] - floor_ms)
    goals = {g["goal"]: g for g in account["goals"]}
    assert goals[">= 2.0x HF bf16"]["ms"] == pytest.approx(hf_ms / 2.0)
    assert goals[">= 1.35x the fastest peer"]["left_ms"] == pytest.approx(hf_ms * 0.6 / 1.35 - floor_ms)
    # 900 TFLOP/s: the step that does the model's FLOPs at that rate
    assert goals[">= 900 model TFLOP/s"]["ms"] == pytest.approx(run["model_flops_per_step"] / 900e12 * 1e3)
    # no power readings on the CPU: the energy columns say so instead of a number
    assert all(g["joules"] is None for g in goals.values())
    assert f"{floor_ms:.1f} ms, - J" in printed and ">= 1.35x the fastest peer" in printed

    # with readings (a GPU run's fields), each goal's energy is its step at the power ours ran at
    floor["rows"]["both"]["gpu"] = {"power_w": 700.0, "joules_per_step": 0.7 * floor_ms}
    for r in steps["variants"]:
        if r.get("step_ms"):
            r["gpu"] = {"power_w": 690.0, "joules_per_step": 0.69 * r["step_ms"]}
    floor_out.write_text(json.dumps(floor))
    steps_out.write_text(json.dumps(steps))
    account = goal_budget.main(argv)
    goal = account["goals"][0]
    assert goal["joules"] == pytest.approx(0.69 * hf_ms / 2.0)
    assert goal["left_joules"] == pytest.approx(goal["joules"] - 0.7 * floor_ms)
    assert account["rows"]["ours"]["beyond_joules"] == pytest.approx(0.69 * rows["ours_bf16"]["step_ms"]
                                                                     - 0.7 * floor_ms)

    # runs of two shapes, a variant that did not run, a file of another script: one line each
    floor["run"]["seq"] = run["seq"] * 2
    floor_out.write_text(json.dumps(floor))
    with pytest.raises(SystemExit, match=r"^goal_budget: the runs differ in seq: "):
        goal_budget.main(argv)
    floor["run"]["seq"] = run["seq"]
    floor_out.write_text(json.dumps(floor))
    with pytest.raises(SystemExit, match=r"^goal_budget: variant 'fp8_delayed' has no timed step"):
        goal_budget.main(argv[:-1] + ["fp8_delayed"])
    with pytest.raises(SystemExit, match=r"^goal_budget: --floor .*steps.json: no 'rows' key; is it "
                                         r"bench/step_floor.py's --out\?$"):
        goal_budget.main(["--floor", str(steps_out), "--steps", str(steps_out)])


# ---------------------------------------------------------------------------------------------------
# update_kernel

# a shape whose every matrix has rows of whole 256-element blocks, so FP8 moments apply on the CPU too
BLOCKS_SHAPE = dict(common.SHAPES["tiny"], vocab_size=512, hidden_size=256, intermediate_size=512,
                    num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)


def test_update_kernel_times_each_update_and_counts_the_bytes_the_state_has(monkeypatch, tmp_path):
    from bench import update_kernel
    from pipeline.train import optim

    monkeypatch.setitem(common.SHAPES, "blocks", BLOCKS_SHAPE)
    launch = optim.BLOCK, optim.WARPS, optim.FP8_BLOCK, optim.FP8_WARPS
    out = tmp_path / "update.json"
    update_kernel.main(["--shape", "blocks", "--device", "cpu", "--master-weights", "bf16_kahan,fp32,bf16_kahan8",
                        "--fp8-launch", "1024x4,512x4", "--steps", "2", "--warmup", "1", "--out", str(out)])
    rows = json.loads(out.read_text())["variants"]
    assert [row["name"] for row in rows] == [
        "torch fused AdamW", "ours bf16_kahan, bf16 moments (4096x8)", "ours bf16_kahan, FP8 moments (1024x4)",
        "ours bf16_kahan, FP8 moments (512x4)", "ours fp32, bf16 moments (4096x8)", "ours fp32, FP8 moments (1024x4)",
        "ours fp32, FP8 moments (512x4)", "ours bf16_kahan8, bf16 moments (4096x8)",
        "ours bf16_kahan8, FP8 moments (1024x4)", "ours bf16_kahan8, FP8 moments (512x4)"]
    for row in rows:
        finite_positive(row, "ms", "gb_per_s", "vs_torch")
    # the sweep leaves the pipeline's launches as they were
    assert (optim.BLOCK, optim.WARPS, optim.FP8_BLOCK, optim.FP8_WARPS) == launch

    # the bytes each row says an update moves: its state read and written, the gradient read, the bf16
    # parameter read and written (only written with an fp32 master, which the update reads instead)
    config = common.llama_config("blocks")
    for row in rows[1:]:
        params = update_kernel.parameters(config, torch.device("cpu"))
        optimizer = optim.AdamW(params, master_weights=row["master_weights"], moments_fp8=row["moments_fp8"])
        optimizer.step()
        matrix = params[2]  # the first layer's query weight
        assert matrix.dim() == 2 and optimizer.quantizes_moments(matrix) == row["moments_fp8"]
        state = optimizer.state[matrix]
        per_element = sum(value.element_size() for key, value in state.items()
                          if torch.is_tensor(value) and value.shape == matrix.shape)
        param_moves = 1 if row["master_weights"] == "fp32" else 2
        assert row["bytes"] == 2 * per_element + 2 + param_moves * 2, row["name"]


def test_update_kernel_refuses_a_launch_shape_the_kernel_cannot_take(capsys):
    from bench import update_kernel

    with pytest.raises(SystemExit):
        update_kernel.main(["--shape", "tiny", "--device", "cpu", "--fp8-launch", "768x4"])
    assert "--fp8-launch 768x4: elements must be a power of two" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        update_kernel.main(["--shape", "tiny", "--device", "cpu", "--launch", "4096x6"])
    assert "--launch 4096x6: elements must be a power of two" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_step.main(TINY + ["--update-launch", "4096x8,8192x8"])
    assert "--update-launch '4096x8,8192x8': one ELEMENTSxWARPS" in capsys.readouterr().err


def test_check_pins_names_each_pin_the_host_does_not_match(tmp_path, capsys):
    from bench.gpu import check_pins

    have = importlib.metadata.version("pytest")
    pins = tmp_path / "host-requirements.txt"
    pins.write_text(f"# the S3 stack\npytest=={have}  # matches\n\npytest==0.0.1\nno-such-package-here==1.0\n")
    assert check_pins.main([str(pins)]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"{pins}:4: pins pytest==0.0.1, this host has {have}; pack the staged wheels with this file (-r)",
        f"{pins}:5: pins no-such-package-here==1.0, this host has none; pack the staged wheels with this file (-r)"]
    pins.write_text(f"pytest=={have}\n")
    assert check_pins.main([str(pins)]) == 0
    pins.write_text("pytest>=8\n")
    with pytest.raises(SystemExit, match=r"host-requirements.txt:1: not a name==version pin: 'pytest>=8'"):
        check_pins.main([str(pins)])


def test_every_variant_the_gpu_parts_name_exists():
    """`bench/gpu/run.sh` names variants and master-weight options by hand; a misspelt one would only fail on
    the GPU host, after the install. Each `--variants` list names what its script knows, each
    `--master-weights` list the optimizer's options."""
    import re
    from pathlib import Path

    from bench import finetune_quality
    from pipeline.train import optim

    text = (Path(__file__).resolve().parents[2] / "bench" / "gpu" / "run.sh").read_text().replace("\\\n", " ")
    # the A/B parts name train_step through the script's shell variables and the `ab` function
    text = re.sub(r"\$one\b|\$eight\b|^(\s*)ab ", lambda m: (m.group(1) or "") + "bench/train_step.py ", text,
                  flags=re.M)
    known = {"train_step": set(train_step.VARIANTS), "finetune_quality": set(finetune_quality.variants())}
    checked = 0
    for line in text.splitlines():
        script = re.search(r"bench/(\w+)\.py", line)
        if not script:
            # a list the substitution above no longer reaches would go unchecked
            assert not re.search(r"--(variants|master-weights) [a-z_]", line), line
            continue
        for names in re.findall(r"--variants (\S+)", line):
            assert set(names.split(",")) <= known[script.group(1)], (script.group(1), names)
            checked += 1
        for names in re.findall(r"--master-weights ([\w,]+)", line):
            assert set(names.split(",")) <= set(optim.MASTER_WEIGHTS), names
            checked += 1
    assert checked >= 6


def test_the_peers_part_runs_each_shape_it_is_given():
    """`run.sh peers 8b-4096,1b-2048` asks the matrix for both shapes' jobs, one call for the two goals' runs:
    a shape it does not know is named as the job it would be, the known one beside it is taken."""
    import subprocess
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run(["bash", "bench/gpu/run.sh", "peers", "8b-4096,no-such-shape"], cwd=repo,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "--only: unknown job peers-no-such-shape;" in done.stderr, done.stderr
    assert "transformer-engine " in done.stdout  # the versions line, also where a package is missing
