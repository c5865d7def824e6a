"""Full training steps, side by side in one process: stock HF Llama against our model in bf16 and FP8.

Each variant (`--variants`) starts from the same weights and sees the same batches, so first-step
losses must agree. A step is the whole thing, gradient clipping and AdamW included; the time is the
median of timed steps.
Without CUDA or TE our model runs on its torch backend, labelled so, and FP8 variants are skipped.
One shape and length per call, so a matrix can be split over short calls. The peers users could pick instead
(`bench/peers.py`) run only when named. Variants and method:
docs/performance.md ("What each bench measures").

    python bench/train_step.py --shape llama3.1-8b --seq 4096 --out results/8b-4096.json
    python bench/train_step.py --shape tiny --seq 128 --device cpu --dtype fp32 --variants hf,ours_bf16
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm  # HF's own, before any peer patches it

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import te_model  # noqa: E402
from bench import common, kernel_kinds, peers, trace_gaps  # noqa: E402
from pipeline.config import TrainConfig  # noqa: E402
from pipeline.train import grad_norm, loop, optim, overlap  # noqa: E402

DEFAULT_MASTER_WEIGHTS = TrainConfig().master_weights

VARIANTS = {  # name: (model, torch.compile, FP8 recipe)
    "hf": ("hf", False, None),
    "hf_compile": ("hf", True, None),
    "ours_bf16": ("ours", False, None),
    "ours_bf16_logits": ("ours", False, None),
    **{f"fp8_{recipe}": ("ours", False, recipe) for recipe in te_model.RECIPES},
    "fp8_delayed_fp8head": ("ours", False, "delayed"),  # ... and the LM head's GEMMs in FP8 (opt-in)
    "fp8_delayed_attn": ("ours", False, "delayed"),  # ... and the attention in FP8 (opt-in)
    "fp8_delayed_attn_fp8head": ("ours", False, "delayed"),  # ... both
    "fp8_delayed_device_plan": ("ours", False, "delayed"),  # ... its plan and loss positions found on the GPU
    "fp8_delayed_torch_adamw": ("ours", False, "delayed"),  # ... updated by torch's fused AdamW, as HF is
    "fp8_delayed_recast": ("ours", False, "delayed"),  # ... FP8 weights cast at every micro-batch
    "fp8_delayed_recompute_mlp": ("ours", False, "delayed"),  # ... each layer's MLP recomputed in backward
    "fp8_delayed_fp8head_recompute_mlp": ("ours", False, "delayed"),  # ... with the FP8 head
    "ours_bf16_graphs": ("ours", False, None),  # ... decoder layers replayed as CUDA graphs
    "fp8_delayed_graphs": ("ours", False, "delayed"),
    "fp8_delayed_fp8head_graphs": ("ours", False, "delayed"),
    "fp8_delayed_fp8head_inline": ("ours", False, "delayed"),  # ... the update in line, not beside the next forward
    "fp8_delayed_fp8head_inline_graphs": ("ours", False, "delayed"),
    "fp8_delayed_fp8head_te_dswiglu": ("ours", False, "delayed"),  # ... the SwiGLU gradient cast by TE's path
    "fp8_delayed_fp8head_te_dswiglu_graphs": ("ours", False, "delayed"),
    "fp8_delayed_fp8head_recast_graphs": ("ours", False, "delayed"),  # ... FP8 weights cast every micro-batch
    "fp8_delayed_fp8head_autograd_residual": ("ours", False, "delayed"),  # ... residual gradients added by autograd
    "fp8_delayed_fp8head_autograd_residual_graphs": ("ours", False, "delayed"),
    "fp8_delayed_fp8head_torch_clip": ("ours", False, "delayed"),  # ... clipped by torch's clip_grad_norm_
    "fp8_delayed_fp8head_moments_fp8": ("ours", False, "delayed"),  # ... AdamW's moments kept in FP8
    "fp8_delayed_fp8head_recompute_mlp_moments_fp8": ("ours", False, "delayed"),  # ... and the MLP recomputed
    "fp8_delayed_fp8head_bwdcast": ("ours", False, "delayed"),  # ... FP8 weights cast again in backward, not kept
    "fp8_delayed_fp8head_bwdcast_moments_fp8": ("ours", False, "delayed"),  # ... and AdamW's moments in FP8
    # ... and the Kahan compensation in a byte a parameter (`bf16_kahan8`, whatever --master-weights says)
    "fp8_delayed_fp8head_bwdcast_moments_fp8_kahan8": ("ours", False, "delayed"),
    "fp8_delayed_fp8head_kahan8": ("ours", False, "delayed"),
    # ... the gradients' FP8 GEMMs with fast accumulation (no fp32 promotion of partial sums), as the forward's
    "fp8_delayed_fp8head_fastacc": ("ours", False, "delayed"),
    "fp8_delayed_fp8head_fastacc_graphs": ("ours", False, "delayed"),
    # ... the clipping norm by `pipeline.train.grad_norm`'s kernel, not torch's `get_total_norm`
    "fp8_delayed_fp8head_fastacc_kernel_norm": ("ours", False, "delayed"),
    # ... attention's Q/K/V split and RoPE by TE's split and kernels, not `te_model.rope_kernels`' one kernel each way
    "fp8_delayed_fp8head_fastacc_tes_rope": ("ours", False, "delayed"),
    "fp8_delayed_fp8head_fastacc_tes_rope_graphs": ("ours", False, "delayed"),
    # ... the final norm as HF's LlamaRMSNorm (torch's kernels), not on TE's RMSNorm kernels (`te_model.norm_te`)
    "fp8_delayed_fp8head_fastacc_hf_norm": ("ours", False, "delayed"),
    "fp8_delayed_fp8head_fastacc_hf_norm_graphs": ("ours", False, "delayed"),
    "fp8_delayed_fp8head_bwdcast_moments_fp8_fastacc_kahan8": ("ours", False, "delayed"),
    # ... with stochastic rounding (`bf16_sr`) and rounding to nearest (`bf16`), whatever --master-weights says
    "fp8_delayed_fp8head_fastacc_sr": ("ours", False, "delayed"),
    "fp8_delayed_fp8head_fastacc_nearest": ("ours", False, "delayed"),
    # ... and the FP8 head's logits and weight-gradient GEMMs too (`fp8_head_fast_accumulation`)
    "fp8_delayed_fp8head_fastacc_headfast": ("ours", False, "delayed"),
    "fp8_delayed_fp8head_fastacc_headfast_graphs": ("ours", False, "delayed"),
    # ... the decoder's FP8 weights written by the update, not cast in forward (`train.fp8_weights_from_update`)
    "fp8_delayed_fp8head_fastacc_fp8_from_update": ("ours", False, "delayed"),
    # ... FP8 weights cast at every micro-batch, not kept from a step's first (as fp8_delayed_recast)
    "fp8_delayed_fp8head_fastacc_recast": ("ours", False, "delayed"),
    # ... the SwiGLU gradient's transpose written by its one-pass kernel, not copied after it
    "fp8_delayed_fp8head_fastacc_dswiglu_t": ("ours", False, "delayed"),
    "fp8_delayed_fp8head_fastacc_dswiglu_t_graphs": ("ours", False, "delayed"),
    "fp8_delayed_fp8head_fastacc_dswiglu_t_fp8_from_update": ("ours", False, "delayed"),
    **{name: ("peer", False, None) for name in peers.PEERS},  # their FP8, if any, is their own
}
DEFAULT_VARIANTS = [name for name, (kind, _, _) in VARIANTS.items() if kind != "peer"]
# variants whose master weights are their own, not --master-weights': suffix -> (option, label)
MASTER_WEIGHTS_SUFFIX = {"_kahan8": ("bf16_kahan8", "1-byte Kahan compensation"),
                         "_sr": ("bf16_sr", "stochastic rounding"), "_nearest": ("bf16", "rounded to nearest")}


def own_master_weights(name: str) -> tuple[str, str] | None:
    """(option, label) of a variant that names its master weights, else None."""
    return next((own for suffix, own in MASTER_WEIGHTS_SUFFIX.items() if name.endswith(suffix)), None)
# Rows per step that fit the HF bf16 baseline in 80 GB (8192 tokens a step); raise with --batch.
DEFAULT_BATCH = {("llama3.2-1b", 2048): 4, ("llama3.2-1b", 4096): 2,
                 ("llama3.1-8b", 2048): 4, ("llama3.1-8b", 4096): 2}
DEFAULT_LAYERS = {"llama3.1-8b": 8}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="llama3.2-1b", choices=sorted(common.SHAPES))
    p.add_argument("--layers", type=int, help="decoder layers (default: the model's; 8 for llama3.1-8b)")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, help="rows per step (default: per shape and seq, else 2)")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help=f"comma-separated of {', '.join(VARIANTS)} (default: all but the peers)")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--micro-batches", type=int, default=1,
                   help="forward and backward passes of --batch rows per optimizer step (gradient accumulation); "
                        "under FP8 ours casts its FP8 weights on the first only, as the pipeline does, but the "
                        "_recast variants")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (torch.compile compiles here)")
    p.add_argument("--profile-steps", type=int, default=0,
                   help="after the timed steps, profile this many more: kernel ms per step by kind, GPU idle")
    p.add_argument("--kernels-top", type=int, default=10,
                   help="with --profile-steps: how many of each variant's largest kernels to keep and print")
    p.add_argument("--gaps", action="store_true",
                   help="with --profile-steps: when the GPU idled in them and what the host did meanwhile")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bf16", choices=sorted(common.DTYPES), help="parameter dtype")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--max-grad-norm", type=float, default=1.0,
                   help="gradient clipping of every variant, HF Trainer's default (0: none); ours as the pipeline "
                        "clips (inside the update), the others with torch's clip_grad_norm_")
    p.add_argument("--master-weights", default=DEFAULT_MASTER_WEIGHTS, choices=optim.MASTER_WEIGHTS,
                   help="how our optimizer keeps bf16 updates (train.master_weights; default: the pipeline's)")
    p.add_argument("--update-launch", default=f"{optim.BLOCK}x{optim.WARPS}",
                   help="ELEMENTSxWARPS per program of our update with bf16 moments (default: the pipeline's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--matmul-size", type=int, help="side of the bf16 peak matmul (default 8192; 512 on CPU)")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend of hf_compile")
    p.add_argument("--memory-cap-gib", type=float,
                   help="hold the CUDA allocator to this many GiB (torch.cuda.set_per_process_memory_fraction): "
                        "whether the step fits a smaller GPU, e.g. 78.5 for an 80 GB H100 on a larger one")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.memory_cap_gib is not None and (not args.device.startswith("cuda") or args.memory_cap_gib <= 0):
        p.error("--memory-cap-gib needs --device cuda and a positive size")
    if args.steps < 1 or args.micro_batches < 1 or args.warmup < 0 or args.profile_steps < 0:
        p.error("--steps and --micro-batches must be >= 1, --warmup and --profile-steps >= 0")
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    launch = common.launches(p, "--update-launch", args.update_launch, 1)
    if len(launch) != 1:
        p.error(f"--update-launch {args.update_launch!r}: one ELEMENTSxWARPS, e.g. 4096x8")
    args.update_launch = launch[0]
    args.layers = args.layers or DEFAULT_LAYERS.get(args.shape)
    args.batch = args.batch or DEFAULT_BATCH.get((args.shape, args.seq), 2)
    return args


def token_batches(vocab: int, batch: int, seq: int, count: int, seed: int) -> list[torch.Tensor]:
    """`count` batches of random token ids on the host, the same for every variant."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch, seq), generator=gen) for _ in range(count)]


def model_flops(state: dict, config, batch: int, seq: int) -> float:
    """6 * (non-embedding parameters incl. lm_head) * tokens + 6 * layers * batch * seq^2 * hidden."""
    body = sum(t.numel() for k, t in state.items() if k.startswith("model.layers.") or k == "model.norm.weight")
    head = config.vocab_size * config.hidden_size
    layers, hidden = config.num_hidden_layers, config.hidden_size
    return 6 * (body + head) * batch * seq + common.attention_flops(layers, batch, seq, hidden)


def build_variant(name: str, config, state: dict, dtype, device, backend: str) -> torch.nn.Module:
    """The variant's model in train mode, holding the reference weights."""
    if VARIANTS[name][0] == "hf":
        model = common.build_hf(config, dtype, device)
        model.load_state_dict(state, strict=True)
    else:
        model = te_model.build_model(config, backend=backend, dtype=dtype, device=device)
        common.load_hf_state(model, state)
        model.fused_loss = not name.endswith("_logits")
        model.fp8_head = "_fp8head" in name
        model.fp8_head_fast_accumulation = "_headfast" in name
        model.mlp_recompute_enable("_recompute_mlp" in name)
        model.fp8_weight_recast_enable("_bwdcast" in name)
        if "_hf_norm" in name:
            model.model.norm.__class__ = LlamaRMSNorm  # the same parameter and epsilon
        for layer in model.model.layers if backend == "te" else ():
            if "_te_dswiglu" in name:
                layer.one_pass_dswiglu = False
            if "_dswiglu_t" in name:
                if not layer.one_pass_dswiglu:
                    raise RuntimeError(f"{name}: this Transformer Engine's MLP has no one-pass SwiGLU backward")
                layer.layernorm_mlp.dswiglu_transpose_in_kernel = True
            if "_autograd_residual" in name:
                layer.fuse_residual_grad = False
            if "_tes_rope" in name:
                layer.fused_rope = False
    return model.train()


def setup_variant(name: str, args, config, state, device, backend: str) -> peers.Peer:
    """The variant's model, optimizer and forward context, as a `peers.Peer` (ours and HF undo nothing)."""
    kind, compiled, recipe = VARIANTS[name]
    dtype = common.DTYPES[args.dtype]
    if kind == "peer":
        return peers.build(name, config, state, dtype, device, args.lr)
    fp8_attention, fast = "_attn" in name, "_fastacc" in name
    if recipe:  # raises FP8UnsupportedError: TE's reason
        te_model.fp8.make_recipe(recipe, fp8_attention=fp8_attention, fast_accumulation=fast)
    model = build_variant(name, config, state, dtype, device, backend)
    if kind == "hf" or name.endswith("_torch_adamw"):
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, fused=True)
    else:  # the pipeline's: the same defaults (weight decay 0.01 on every parameter, as torch's)
        master_weights = (own_master_weights(name) or (args.master_weights,))[0]
        optimizer = optim.AdamW(model.parameters(), lr=args.lr, master_weights=master_weights,
                                moments_fp8="_moments_fp8" in name)
        if name.endswith("_fp8_from_update"):
            optimizer.fp8_weights = model.fp8_weights_from_update()
    forward = torch.compile(model, backend=args.compile_backend) if compiled else model
    return peers.Peer(forward, optimizer, lambda: te_model.fp8_autocast(recipe, fp8_attention=fp8_attention,
                                                                      fast_accumulation=fast))


def keeps_fp8_weights(name: str, micro_batches: int) -> bool:
    """Whether a variant of ours casts its FP8 weights on a step's first micro-batch only and reuses them for
    the others, eagerly and in CUDA graphs: by the pipeline's rule (`loop.keeps_fp8_weights`), the `_recast`
    variants casting at every micro-batch as with `train.recast_fp8_weights` (set by `_bwdcast` too)."""
    kind, _, recipe = VARIANTS[name]
    train = TrainConfig(fp8=recipe or "none", grad_accum_steps=micro_batches,
                        recast_fp8_weights="_recast" in name or "_bwdcast" in name)
    return kind == "ours" and loop.keeps_fp8_weights(train)


def capture_graphs(name: str, model, ids: torch.Tensor, device, micro_batches: int) -> bool:
    """The `_graphs` variants: the decoder layers captured for the first batch's layout, before any step;
    the weight gradients kept in the graphs' buffers unless micro-batches accumulate them, the FP8 weights
    kept across a step's micro-batches where `keeps_fp8_weights` says so."""
    recipe = VARIANTS[name][2]
    made = te_model.fp8.make_recipe(recipe, fp8_attention="_attn" in name,
                                    fast_accumulation="_fastacc" in name) if recipe else None
    graphs = te_model.graphs.capture_decoder_graphs(
        model, common.step_inputs("ours", ids, device), recipe=made, accumulate=micro_batches > 1,
        cache_fp8_weights=keeps_fp8_weights(name, micro_batches))
    return graphs.cache_fp8_weights  # the steps then mark each micro-batch


def run_variant(name: str, args, config, state, batches, device, backend: str) -> dict:
    """Warm up, then time `args.steps` full training steps; the raw per-variant measurements."""
    common.reset_peak(device)
    variant = setup_variant(name, args, config, state, device, backend)
    try:
        return time_steps(name, variant, args, batches, device)
    finally:
        variant.close()


def time_steps(name: str, variant: peers.Peer, args, batches, device) -> dict:
    """`batches`: one list of micro-batches per step."""
    kind = VARIANTS[name][0]
    forward, optimizer = variant.model, variant.optimizer
    timer, losses, wall_start = common.StepTimer(device), [], None
    from_update = getattr(optimizer, "fp8_weights", None) is not None  # the update writes the FP8 weights
    capture_peak = None
    if name.endswith("_graphs"):  # the graphs' choice once captured, as the pipeline's step takes it
        cache_weights = capture_graphs(name, forward, batches[0][0], device, len(batches[0]))
        capture_peak = common.peak_gib(device)
        common.reset_peak(device)
    else:
        cache_weights = keeps_fp8_weights(name, len(batches[0]))

    # ours on a GPU, as the pipeline runs it (`train.overlap_update`): each step's update on a side stream,
    # beside the next step's forward; the `_inline` variants without
    overlapped = kind == "ours" and device.type == "cuda" and "_inline" not in name
    update = overlap.UpdateOverlap(forward, optimizer, device).step if overlapped else optimizer.step
    params = [p for group in optimizer.param_groups for p in group["params"]]
    folded = isinstance(optimizer, optim.AdamW) and "_torch_clip" not in name

    def clip():  # as the pipeline's step clips (pipeline.train.loop), or as HF Trainer does
        if not args.max_grad_norm:
            return
        if folded:
            norm_of = grad_norm.total_norm if "_kernel_norm" in name else torch.nn.utils.get_total_norm
            optim.clip_in_update(optimizer, params, args.max_grad_norm, norm_of=norm_of)
        else:
            torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)

    def train_step(micro_batches, phase=contextlib.nullcontext):  # profile_steps marks the phases for --gaps
        count, step_loss = len(micro_batches), None
        for i, ids in enumerate(micro_batches):
            with phase("train.batch"):
                inputs = common.step_inputs(kind, ids, device, planned_on_device=name.endswith("_device_plan"))
            if cache_weights:  # FP8 weights cast on the first micro-batch, reused after
                inputs["is_first_microbatch"] = i == 0
            if from_update:  # every forward reuses them
                inputs["is_first_microbatch"] = False
            with phase("train.forward"), variant.autocast():
                loss = forward(**inputs).loss
            with phase("train.backward"):  # outside the autocast: TE runs the FP8 backward
                (loss / count if count > 1 else loss).backward()
            step_loss = loss.detach() if step_loss is None else step_loss + loss.detach()
        with phase("train.optimizer"):
            clip()
            update()
            optimizer.zero_grad(set_to_none=True)
        losses.append(step_loss / count if count > 1 else step_loss)

    timed = batches[: args.warmup + args.steps]
    sampler = common.GpuSampler(device)
    try:
        for i, micro_batches in enumerate(timed):
            if i == args.warmup:
                _sync(device)
                wall_start = time.perf_counter()
                timer.mark()
                sampler.start()
            train_step(micro_batches)
            if i >= args.warmup:
                timer.mark()
        _sync(device)
    finally:
        sampler.stop()
    wall_ms = (time.perf_counter() - wall_start) * 1e3 / args.steps
    step_ms = timer.step_ms()
    peak = common.peak_gib(device)
    if capture_peak is not None:  # the graphs' activations are in no allocated figure: added
        peak = max(capture_peak, peak + common.graph_pool_unallocated_gib(device))
    result = {"step_ms": statistics.median(step_ms), "step_ms_min": min(step_ms), "step_ms_max": max(step_ms),
              "wall_ms_mean": wall_ms, "peak_mem_gib": peak,
              "loss_first": float(losses[0]), "loss_last": float(losses[-1])}
    gpu = sampler.summary(result["step_ms"])
    if gpu is not None:
        result["gpu"] = gpu
    if args.profile_steps:
        result["profile"] = profile_steps(train_step, batches[len(timed):], device, gaps=args.gaps,
                                          top=args.kernels_top)
    return result


def profile_steps(train_step, batches, device, gaps: bool = False, top: int = 10) -> dict:
    """`kernel_kinds.breakdown` of these steps, profiled back to back, with their mean wall time and the GPU's
    idle time in it (wall less busy): where a variant's step goes, beside its timing. With `gaps`, also
    `trace_gaps.analyse` of them: each idle gap put down to the step's phase and the host's operator."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    _sync(device)
    with torch.profiler.profile(activities=activities) as prof:
        start = time.perf_counter()
        for micro_batches in batches:
            if gaps:
                with torch.profiler.record_function(trace_gaps.STEP_RANGE):
                    train_step(micro_batches, phase=torch.profiler.record_function)
            else:
                train_step(micro_batches)
        _sync(device)
        wall_ms = (time.perf_counter() - start) * 1e3 / len(batches)
    found = kernel_kinds.breakdown(prof, len(batches), top=top)
    result = {"steps": len(batches), "wall_ms": wall_ms, "idle_ms": max(0.0, wall_ms - found["busy_ms"]), **found}
    if gaps and device.type == "cuda":
        result["gaps"] = trace_gaps.analyse(trace_gaps.chrome_trace(prof), trace_gaps.STEP_RANGE)
    return result


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def label(name: str, backend: str, dtype: str) -> str:
    kind, compiled, recipe = VARIANTS[name]
    if kind == "peer":
        return peers.LABELS[name]
    if kind == "hf":
        return f"HF LlamaForCausalLM sdpa {dtype}" + (" + compile" if compiled else "")
    where = "TE" if backend == "te" else "torch backend (no TE)"
    return (f"ours {where}, " + (f"FP8 {recipe}" if recipe else dtype) + (", HF loss" if "logits" in name else "")
            + (" + FP8 attention" if "_attn" in name else "")
            + (" + FP8 head" if "_fp8head" in name else "")
            + (", MLP recomputed" if "_recompute_mlp" in name else "")
            + (", FP8 weights cast again in backward" if "_bwdcast" in name else "")
            + (", planned on GPU" if name.endswith("_device_plan") else "")
            + (", torch AdamW" if name.endswith("_torch_adamw") else "")
            + (", update in line" if "_inline" in name else "")
            + (", SwiGLU gradient cast by TE" if "_te_dswiglu" in name else "")
            + (", its transpose written by the cast's kernel" if "_dswiglu_t" in name else "")
            + (", FP8 weights cast every micro-batch" if "_recast" in name else "")
            + (", residual gradients added by autograd" if "_autograd_residual" in name else "")
            + (", clipped by torch's clip_grad_norm_" if "_torch_clip" in name else "")
            + (", FP8 moments" if "_moments_fp8" in name else "")
            + (f", {own_master_weights(name)[1]}" if own_master_weights(name) else "")
            + (", gradients' GEMMs fast-accumulated" if "_fastacc" in name else "")
            + (", the head's too" if "_headfast" in name else "")
            + (", clipping norm in one kernel" if "_kernel_norm" in name else "")
            + (", TE's split and RoPE" if "_tes_rope" in name else "")
            + (", HF's final norm" if "_hf_norm" in name else "")
            + (", FP8 weights written by the update" if name.endswith("_fp8_from_update") else "")
            + (", CUDA graphs" if name.endswith("_graphs") else ""))


def skip_reason(name: str, backend: str, reason: str | None, device: torch.device) -> str | None:
    if VARIANTS[name][0] == "peer":
        return peers.unavailable_reason(name, device)
    if VARIANTS[name][2] and backend != "te":
        return f"FP8 needs Transformer Engine on CUDA: {reason}"
    if name.endswith("_graphs") and backend != "te":
        return f"CUDA graphs need Transformer Engine on CUDA: {reason}"
    return None


def measure(args, device) -> dict:
    """Every requested variant on the same weights and batches; a result row (or skip/error) each."""
    backend, backend_reason = common.ours_backend(device)
    config = common.llama_config(args.shape, args.layers)
    steps, micro = args.warmup + args.steps + args.profile_steps, args.micro_batches
    flat = token_batches(config.vocab_size, args.batch, args.seq, steps * micro, args.seed)
    batches = [flat[i * micro:(i + 1) * micro] for i in range(steps)]
    size = args.matmul_size or (8192 if device.type == "cuda" else 512)
    matmul_peak = common.matmul_peak_flops(device, size)
    common.free_memory()
    state = common.reference_state(config, common.DTYPES[args.dtype], device, args.seed)
    flops = model_flops(state, config, args.batch, args.seq) * micro
    tokens = args.batch * args.seq * micro
    run = {"shape": args.shape, "layers": config.num_hidden_layers, "seq": args.seq, "batch": args.batch,
           "micro_batches": micro, "tokens_per_step": tokens, "dtype": args.dtype, "steps": args.steps,
           "warmup": args.warmup,
           "model_flops_per_step": flops, "matmul_peak_tflops": matmul_peak / 1e12, "matmul_size": size,
           "datasheet_peak_tflops": common.DATASHEET_BF16_FLOPS / 1e12, "ours_backend": backend,
           "ours_backend_reason": backend_reason, "master_weights": args.master_weights,
           "update_launch": "x".join(map(str, args.update_launch))}
    result = {"environment": common.environment(device), "run": run, "variants": []}
    if args.memory_cap_gib is not None:
        run["memory_cap_gib"] = args.memory_cap_gib
    with capped_memory(device, args.memory_cap_gib):
        for name in args.variants:
            print(f"[train_step] {name} ...", file=sys.stderr, flush=True)
            result["variants"].append(variant_row(name, args, config, state, batches, device, backend,
                                                  backend_reason))
            add_rates(result["variants"], flops, tokens, matmul_peak)
            common.write_json(args.out, result)  # after every variant: a run cut short keeps what it measured
    return result


def variant_row(name: str, args, config, state, batches, device, backend: str, backend_reason) -> dict:
    """One variant's measurements, or why it was skipped or failed; memory is freed afterwards."""
    row = {"variant": name, "label": label(name, backend, args.dtype)}
    row["skipped"] = skip_reason(name, backend, backend_reason, device)
    if not row["skipped"]:
        try:
            row.update(run_variant(name, args, config, state, batches, device, backend))
        except te_model.FP8UnsupportedError as exc:
            row["skipped"] = str(exc)
        except torch.OutOfMemoryError as exc:
            row["error"] = f"out of memory at batch {args.batch} x seq {args.seq}: {str(exc).splitlines()[0]}"
        except Exception as exc:  # a peer is third-party code: its failure is a result, not the end of the run
            if VARIANTS[name][0] != "peer":
                raise
            row["error"] = f"failed: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}"
    torch._dynamo.reset()
    common.free_memory()
    return row


def fastest_peer(rows: list[dict]) -> dict | None:
    """The timed peer row with the shortest step, or None when no peer ran."""
    timed = [r for r in rows if r["variant"] in peers.PEERS and "step_ms" in r]
    return min(timed, key=lambda r: r["step_ms"], default=None)


def add_rates(rows: list[dict], flops: float, tokens: int, matmul_peak: float) -> None:
    """tokens/s, model TFLOP/s, both MFUs and the speed-ups over `hf` and over the fastest peer (when they
    ran) for every timed row."""
    base = next((r for r in rows if r["variant"] == "hf" and "step_ms" in r), None)
    peer = fastest_peer(rows)
    for row in rows:
        if "step_ms" not in row:
            continue
        seconds = row["step_ms"] / 1e3
        row["tokens_per_s"] = tokens / seconds
        row["model_tflops"] = flops / seconds / 1e12
        row["mfu_datasheet"] = flops / seconds / common.DATASHEET_BF16_FLOPS
        row["mfu_measured_peak"] = flops / seconds / matmul_peak
        row["speedup_vs_hf"] = base["step_ms"] / row["step_ms"] if base else None
        row["speedup_vs_fastest_peer"] = peer["step_ms"] / row["step_ms"] if peer else None
        # identical starting weights and batches: only kernel rounding may separate the first losses
        row["loss_first_diff_vs_hf"] = row["loss_first"] - base["loss_first"] if base else None


def print_table(result: dict) -> None:
    run, env = result["run"], result["environment"]
    default_launch = f"{optim.BLOCK}x{optim.WARPS}"
    print(f"\n{env['device']}, {run['shape']} ({run['layers']} layers), {run['batch']}x{run['seq']} tokens"
          f"{' x ' + str(run['micro_batches']) + ' micro-batches' if run.get('micro_batches', 1) > 1 else ''}, "
          f"{run['dtype']} params, full step incl. AdamW (ours: master_weights={run['master_weights']}"
          f"{', update programs ' + run['update_launch'] if run.get('update_launch', default_launch) != default_launch else ''}), "
          f"median of {run['steps']} "
          f"(matmul peak {run['matmul_peak_tflops']:.0f} TFLOP/s)")
    if env.get("host_cpu"):
        print(f"host: {env['host_cpu']}")
    if run.get("memory_cap_gib"):
        print(f"the allocator held to {run['memory_cap_gib']} GiB")
    peer = fastest_peer(result["variants"])
    if peer:
        print(f"vs peer: against the fastest peer, {peer['label']} ({peer['step_ms']:.1f} ms)")
    print(f"{'variant':44s} {'ms/step':>8s} {'tokens/s':>10s} {'TFLOP/s':>8s} {'MFU989':>7s} {'MFUmeas':>7s} "
          f"{'GiB':>6s} {'vs HF':>6s} {'vs peer':>7s} {'loss0':>8s}")
    for r in result["variants"]:
        if "step_ms" not in r:
            print(f"{r['label']:44s} {'skipped: ' + r['skipped'] if r.get('skipped') else r.get('error')}")
            continue
        print(f"{r['label']:44s} {r['step_ms']:8.1f} {r['tokens_per_s']:10.0f} {r['model_tflops']:8.1f} "
              f"{r['mfu_datasheet']:7.1%} {r['mfu_measured_peak']:7.1%} {common.fmt(r['peak_mem_gib'], '6.1f')} "
              f"{common.fmt(r['speedup_vs_hf'], '5.2f')}x {common.fmt(r.get('speedup_vs_fastest_peer'), '6.2f'):>6s}x "
              f"{r['loss_first']:8.4f}")
    print_power(result["variants"])
    print_profiles(result["variants"])


def print_power(rows: list[dict]) -> None:
    """Median SM clock and board power over each variant's timed steps, and the energy of a step."""
    rows = [r for r in rows if "gpu" in r]
    if not rows:
        return
    print("\nGPU during the timed steps (NVML, medians): SM clock, board power, energy a step")
    print(f"{'variant':44s} {'SM MHz':>7s} {'watts':>6s} {'J/step':>7s}")
    for r in rows:
        g = r["gpu"]
        print(f"{r['label']:44s} {g['sm_clock_mhz']:7.0f} {g['power_w']:6.0f} {g['joules_per_step']:7.1f}")


PROFILE_COLUMNS = ("gemm fp8", "gemm", "attention", "optimizer", "loss", "embedding", "cast/transpose/amax", "norm",
                   "swiglu", "rope", "other")


def print_profiles(rows: list[dict]) -> None:
    """Kernel ms per profiled step by kind, the GPU's idle ms, then each variant's largest kernels."""
    rows = [r for r in rows if "profile" in r]
    if not rows:
        return
    print("\nprofiled steps, ms per step: wall, GPU idle, kernel time by kind")
    print(f"{'variant':40s} {'wall':>7s} {'idle':>6s} " + " ".join(f"{k[:9]:>9s}" for k in PROFILE_COLUMNS))
    for r in rows:
        p = r["profile"]
        print(f"{r['label']:40s} {p['wall_ms']:7.1f} {p['idle_ms']:6.1f} "
              + " ".join(f"{p['kernel_ms'].get(k, 0.0):9.2f}" for k in PROFILE_COLUMNS))
    for r in rows:
        print(f"{r['label']} largest kernels (ms per step, calls per step):")
        for name, ms, calls in r["profile"]["kernels_top"]:
            print(f"  {ms:7.2f} {calls:4d}  {name}")
    for r in rows:
        if "gaps" in r["profile"]:
            print(trace_gaps.format_report(r["label"], r["profile"]["gaps"]))


@contextlib.contextmanager
def capped_memory(device: torch.device, gib: float | None):
    """Hold the allocator to `gib` GiB of this GPU inside the block (a variant that needs more is an
    out-of-memory row), and to the whole GPU again after it: the cap is the process's, not the run's. None:
    no cap. The allocator's cache is emptied first: torch checks the cap only when it asks CUDA for memory,
    so blocks cached from before would serve the step beyond it."""
    if gib is None:
        yield
        return
    index = torch.cuda.current_device() if device.index is None else device.index  # torch wants an index here
    total = torch.cuda.get_device_properties(index).total_memory
    if gib * 2**30 > total:
        raise SystemExit(f"--memory-cap-gib {gib}: the GPU has only {total / 2**30:.1f} GiB")
    common.free_memory()
    torch.cuda.set_per_process_memory_fraction(gib * 2**30 / total, index)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, index)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = common.setup_device(args.device)
    pipeline_launch = optim.BLOCK, optim.WARPS
    optim.BLOCK, optim.WARPS = args.update_launch  # every variant's update in this run
    try:
        result = measure(args, device)
    finally:
        optim.BLOCK, optim.WARPS = pipeline_launch
    print_table(result)
    return result


if __name__ == "__main__":
    main()
