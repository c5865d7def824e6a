#!/usr/bin/env bash
# One part of the GPU checks, on a node with the project and Transformer Engine installed. On a host
# without a package index whose wheels are staged in /tmp/gpu-stage with their install script, they are
# installed into /tmp/site first (once); pack those wheels with bench/gpu/host-requirements.txt as an extra
# requirements file, which pins the S3 stack the pipeline needs; add the two wheels of
# bench/gpu/peer-requirements.txt (the `peers` part) with `pip download --no-deps` beside them. Logs and JSON go to /tmp/results, packed
# into $OUT/results-<part>.tgz at the end when $OUT is set.
#   bash bench/gpu/run.sh smoke               GPU tests of the loss, FP8-head, SwiGLU and optimizer kernels, FP8 attention and the
#                                             bench scripts
#   bash bench/gpu/run.sh gpu-tests [args]    every GPU test but the two-GPU scaling test (args to pytest, e.g.
#                                             --ignore tests/gpu/test_job.py to split it in two shorter runs)
#   bash bench/gpu/run.sh scaling [args]      tests/gpu/test_scaling.py (two GPUs; e.g. -k wider)
#   bash bench/gpu/run.sh profile [args]      bench/parallel_profile.py, 1 process (whole and half batch) vs 2 DDP
#                                             vs 2 FSDP2 processes, FP8; then bf16, half batch vs DDP (PROFILE_BF16=0: not)
#   bash bench/gpu/run.sh profile-attn        the same in bf16, 1 (whole and half batch) vs 2 DDP processes, with
#                                             TE's attention and with the torch backend's SDPA: what TE's
#                                             attention costs the host, and where (--host-breakdown)
#   bash bench/gpu/run.sh attention-host      bench/attention_host.py: host ms per TE attention call by rows and
#                                             segment layout (why 16-row batches cost more host time)
#   bash bench/gpu/run.sh profile-step [args] the same profiler on one GPU, one FP8 training step, with and without
#                                             the host one step ahead; default
#                                             8B shapes (8 layers, 2 x 4096); e.g. 1B: --shape llama3.2-1b
#                                             --layers 16 --seq 2048 --global-batch 8
#   bash bench/gpu/run.sh layer-kernels       bench/layer_kernels.py: the 8B-shape stack's kernel time by kind, with
#                                             the attention in THD, BSHD and SBHD; FP8 delayed (also with FP8
#                                             attention in BSHD and SBHD), then bf16
#   bash bench/gpu/run.sh step-kernels [args] bench/train_step.py at 8B shapes (8 layers, 2 x 4096): HF, FP8, FP8 head,
#                                             timed, then two profiled steps each: kernel time by kind, GPU idle
#   bash bench/gpu/run.sh matrix [args...]    bench/matrix.py with these arguments
#   bash bench/gpu/run.sh peers SHAPES [args] bench/matrix.py's jobs peers-SHAPE for each of SHAPES (8b-4096, 1b-2048,
#                                             8b-256, comma-separated): HF, the peers (Liger, torchao FP8, Accelerate TE
#                                             FP8, TE's te_llama swap) and ours in one process a shape, one shape after
#                                             another (2-3 minutes each on an H200: 8b-4096,1b-2048 fit one 10-minute call)
#   bash bench/gpu/run.sh quality [args]      bench/finetune_quality.py: fine-tuning quality of each master-weight option
#                                             against HF's fp32-master training, on real text (--vocab 128256:
#                                             a Llama-sized head, for the FP8 head)
#   bash bench/gpu/run.sh job-8b PHASE [args] bench/job_8b.py: the real job at the Llama-3.1-8B shape on this host, one
#                                             bounded phase a command (plan, base, job, report; docs/scale.md);
#                                             files under /tmp/job8b (--workdir, --out-dir to move them)
#   bash bench/gpu/run.sh master-cost         bench/train_step.py at the Llama-3.1-8B shape (32 layers, 2 x 4096), FP8
#                                             delayed, once per master-weight option; then the optimizer's GPU tests
#   bash bench/gpu/run.sh moments-fp8         FP8 moments (train.moments_fp8): their GPU tests; the update alone over the
#                                             8B model's parameters beside torch's fused AdamW; fine-tuning quality
#                                             against HF's fp32-master training (136M, bytes), also of bf16_kahan8 and
#                                             of fast accumulation
#   bash bench/gpu/run.sh sr-cost [args]     what stochastic rounding (bf16_sr) costs: the optimizer's GPU tests; the update
#                                             alone over the 8B model's parameters (bf16, bf16_sr, bf16_kahan); the
#                                             Llama-3.1-8B step (32 layers, 2 x 4096) beside HF with each of the three
#   bash bench/gpu/run.sh fast-accum [args]   fast accumulation in the FP8 head's GEMMs too (logits, weight gradient): the
#                                             Llama-3.1-8B step (32 layers, 2 x 4096) and the 1B step (4 x 2048) beside HF
#                                             and the default; the GPU tests of fast accumulation; fine-tuning quality at
#                                             a 128k vocabulary against HF's fp32-master training
#   bash bench/gpu/run.sh kernel-norm [args]  the clipping norm in one kernel (pipeline.train.grad_norm) against torch's: its GPU
#                                             test; the norm alone at several program sizes (bench/grad_norm.py); the 1B
#                                             step (4 x 2048; twice, each order) beside HF, profiled (70 largest kernels
#                                             in the JSON); the step's FP8 transposes timed on their own
#                                             (bench/fp8_transpose.py); the Llama-3.1-8B step (32 layers, 2 x 4096), the same
#   bash bench/gpu/run.sh fused-rope [args]   attention's split and RoPE in one kernel each way (te_model.rope_kernels): its GPU
#                                             tests (against torch and TE's RoPE, in layers, CUDA graphs); the 1B step
#                                             (4 x 2048) with it and with TE's, profiled; the 8B step (32 layers, 2 x 4096)
#   bash bench/gpu/run.sh final-norm [args]  the model's final RMSNorm on TE's kernels (te_model.norm_te) against HF's: its GPU
#                                             tests; the 1B step (4 x 2048) with each, eager and graphed, profiled; the 8B
#                                             step (32 layers, 2 x 4096; args to it, e.g. --layers 16 on an H100)
#   bash bench/gpu/run.sh fp8-from-update [args] the decoder's FP8 weights written by the update
#                                             (train.fp8_weights_from_update) and TE's cached FP8 weights: the GPU
#                                             tests (bit for bit TE's cast); the host's cost of TE's cache
#                                             (bench/fp8_cache_host.py); the Llama-3.1-8B step
#                                             (32 layers) at 8 x 256 beside HF, at 8 x 256 with 4 micro-batches a step
#                                             (also TE's cache), at 2 x 4096 beside HF, profiled (SKIP_LONG=1: not)
#                                             (HF's 32 layers need more than 80 GB: on an H100, --layers 16)
#   bash bench/gpu/run.sh fp8-cache [args]    TE's cache of the FP8 weights across micro-batches in the eager loop: the
#                                             loop's GPU tests with accumulation; the step with micro-batches casting
#                                             at every call against the cache, alternating: 8 layers, 4 x 2 x 1024,
#                                             then 32 layers, 8 x 8 x 256 (args to it, e.g. --layers 16 on an H100)
#   bash bench/gpu/run.sh memory-8b [args]    the Llama-3.1-8B step (32 layers, 2 x 4096, bf16_kahan) beside HF with
#                                             each way to hold less: FP8 weights cast again in backward, FP8 moments,
#                                             both, the MLP recomputed; the 80 GB preset's step held to 78.5 GiB;
#                                             then the GPU tests of the first two
#   bash bench/gpu/run.sh update-launch [args] the bf16-moment update (bf16_kahan, bf16_sr) at several program sizes
#                                             (bench/update_kernel.py --launch); then, if a size beats the pipeline's
#                                             for bf16_kahan, the Llama-3.1-8B step (32 layers, 2 x 4096) with it and
#                                             with the pipeline's, twice each, alternating, one process each
#   bash bench/gpu/run.sh floor [args]        tests/gpu/test_step_floor.py, then the Llama-3.1-8B step's GEMMs and attention
#                                             alone (32 layers, 2 x 4096; bench/step_floor.py), FP8 GEMMs then bf16: the
#                                             least the same math takes
#   bash bench/gpu/run.sh goals [args]       what the 8B goals leave beyond the floor, one start: the floor of the Llama-3.1-8B
#                                             step (32 layers, 2 x 4096, FP8 GEMMs), then HF, the peers and the default
#                                             step (bench/train_step.py), then bench/goal_budget.py over the two
#                                             (about 4 minutes on an H200, the install included; HF's step needs more than 80 GB)
#   bash bench/gpu/run.sh norm-cudnn [args]   TE's RMSNorm forward kernels against cuDNN's (NVTE_NORM_FWD_USE_CUDNN, read
#                                             once a process): the default step at 1B (16 layers, 4 x 2048) and 8B (32 layers,
#                                             2 x 4096), one process per backend, twice each, alternating, each profiled one
#                                             step (the norms' kernel time). The backward stays on TE's kernels: cuDNN's
#                                             norm backward with the residual gradient added needs cuDNN 9.21 or later
set -uo pipefail
part=${1:?usage: run.sh smoke|gpu-tests|scaling|profile|profile-attn|attention-host|profile-step|layer-kernels|step-kernels|matrix|peers|quality|job-8b|master-cost|sr-cost|moments-fp8|fast-accum|kernel-norm|fused-rope|final-norm|fp8-from-update|fp8-cache|dswiglu-t|memory-8b|update-launch|floor|goals|norm-cudnn [args]}; shift
R=/tmp/results; mkdir -p $R
if [ -f /tmp/gpu-stage/host-install.sh ] && [ ! -f /tmp/site/.ready ]; then
  OUT= bash /tmp/gpu-stage/host-install.sh > $R/install.log 2>&1 || { tail -20 $R/install.log; exit 1; }
fi
[ -f /tmp/site/env.sh ] && source /tmp/site/env.sh
# Staged wheels packed without host-requirements.txt bring another S3 stack (an s3fs from before 2024, which
# the job cannot use): say so here, not as a failure deep in a test.
if [ -f /tmp/gpu-stage/host-install.sh ]; then
  python3 bench/gpu/check_pins.py bench/gpu/host-requirements.txt || exit 1
fi
# A newer cuDNN than the host's, staged as the pieces of
# its wheel (split -b 52m) with the wheel's name in /tmp/cudnn-stage/wheel and its sha256 in .../sha256:
# joined, checked and installed into /tmp/cudnn once, then put ahead of the host's on the library path. Off
# unless staged: on the H200 host, TE's layers ran slower on 9.28.1 than on the host's 9.14.0 (docs/performance.md).
if [ -f /tmp/cudnn-stage/wheel ] && [ ! -f /tmp/cudnn/.ready ]; then
  whl=/tmp/cudnn-stage/$(cat /tmp/cudnn-stage/wheel)
  cat /tmp/cudnn-stage/piece-* > "$whl" && echo "$(cat /tmp/cudnn-stage/sha256)  $whl" | sha256sum -c --quiet \
    && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/cudnn "$whl" \
    && touch /tmp/cudnn/.ready || { echo "cuDNN from /tmp/cudnn-stage did not install"; exit 1; }
  rm -f "$whl"
fi
# Transformer Engine loads cuDNN from $CUDNN_HOME before the system's; cuDNN loads its parts by name.
[ -f /tmp/cudnn/.ready ] && export CUDNN_HOME=/tmp/cudnn/nvidia/cudnn \
  LD_LIBRARY_PATH=/tmp/cudnn/nvidia/cudnn/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # the checkout, not installed here
quiet() { grep -v "it/s\]\|Warning\|warn(" ; }
# The A/B parts' two steps, profiled: 1B (16 layers, 4 x 2048) and 8B (32 layers, 2 x 4096), as the pipeline
# runs them (bf16_kahan); `show NAME` keeps a step's log as $R/$part-NAME.log and prints its tables
one="bench/train_step.py --shape llama3.2-1b --layers 16 --batch 4 --seq 2048 --steps 15 --profile-steps 2 --master-weights bf16_kahan --kernels-top 70"
eight="bench/train_step.py --shape llama3.1-8b --layers 32 --batch 2 --seq 4096 --steps 8 --profile-steps 1 --master-weights bf16_kahan --kernels-top 70"
show() { quiet | tee $R/$part-$1.log | sed -n '/^NVIDIA/,/largest kernels/p'; }
# step_line JSON LABEL [KIND...]: one line for a train_step run's first variant: ms, watts, MHz and joules a
# step, then the profiled kernel ms of each KIND it has
step_line() {
  python3 - "$@" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))["variants"][0]
g = r.get("gpu") or dict(power_w=0, sm_clock_mhz=0, joules_per_step=0)
kinds = (r.get("profile") or {}).get("kernel_ms", {})
picked = [f"{k} {kinds[k]:.1f}" for k in sys.argv[3:] if k in kinds]
print(f"{sys.argv[2]}: {r['step_ms']:.1f} ms, {g['power_w']:.0f} W, {g['sm_clock_mhz']:.0f} MHz, "
      f"{g['joules_per_step']:.1f} J" + ("; kernel ms " + ", ".join(picked) if picked else ""))
PY
}
ab() {  # ab --variants 1B-VARIANTS --variants 8B-VARIANTS [args to the 8B step]: a part's A/B at both shapes
  python3 $one --out $R/$part-1b.json "$1" "$2" 2>&1 | show 1b; rc=$((rc | PIPESTATUS[0]))
  python3 $eight --out $R/$part-8b.json "$3" "$4" "${@:5}" 2>&1 | show 8b; rc=$((rc | PIPESTATUS[0]))
}
rc=0  # the Python commands' exit statuses, not those of the filters after them
case $part in
  smoke)
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    nvidia-smi topo -m    # how the GPUs are linked (NVLink or PCIe): it bounds what FSDP2 can overlap
    python3 -c "import torch, transformers, transformer_engine as te, triton; from transformer_engine.pytorch.utils import get_cudnn_version as v; print('torch', torch.__version__, 'transformers', transformers.__version__, 'te', te.__version__, 'cudnn (TE)', v(), 'triton', triton.__version__)"
    python3 -m pytest tests/unit/test_ce_kernel.py tests/unit/test_fp8_kernels.py tests/unit/test_optim.py \
      tests/unit/test_moments_fp8.py tests/gpu/test_swiglu.py \
      tests/gpu/test_bench.py "tests/gpu/test_te.py::test_fp8_attention_tracks_bf16_attention" \
      "tests/gpu/test_te.py::test_empty_segments_change_nothing" \
      "tests/gpu/test_te.py::test_fp8_attention_is_refused_on_hopper_because_te_cannot_train_it" \
      -m gpu -s -q -p no:cacheprovider -o addopts="" 2>&1 | quiet | tee $R/smoke.log | grep "FP8 attention\|passed\|failed\|Error" | tail -15; rc=$((rc | PIPESTATUS[0])) ;;
  gpu-tests)
    log=$R/gpu-tests.log  # a second call on the same start keeps the first's log
    [ -e $log ] && log=$R/gpu-tests-$(date +%H%M%S).log
    # Test paths among the arguments run alone; otherwise the whole of tests/ (an --ignore's path is not one).
    where=tests; prev=
    for a in "$@"; do case "$prev:$a" in --ignore:*|--deselect:*) ;; *:tests/*) where= ;; esac; prev=$a; done
    python3 -m pytest $where -m gpu --ignore tests/gpu/test_scaling.py -s -q -p no:cacheprovider -o addopts="" "$@" 2>&1 | quiet \
      | tee $log | grep "passed\|failed\|skipped\|Error\|^FAILED" | tail -15; rc=$((rc | PIPESTATUS[0])) ;;
  scaling)
    python3 -m pytest tests/gpu/test_scaling.py -m gpu -s -q -p no:cacheprovider -o addopts="" "$@" 2>&1 | quiet | tee $R/scaling.log | grep -A8 "^| run\|passed\|failed\|Error"; rc=$((rc | PIPESTATUS[0])) ;;
  profile)
    # FP8 (all layouts, or those given with --layouts), then bf16 for the half batch and DDP; each with when
    # the GPU sat idle and what the host did meanwhile; FP8's rank-0 traces kept (gzipped) in $R/traces
    python3 bench/parallel_profile.py --shape llama-380m --seq 1024 --global-batch 32 --fp8 delayed \
      --trace-dir $R/traces --out $R/parallel.json "$@" 2>&1 | quiet | tee $R/profile.log \
      | sed -n '/GPU time per step/,/^ *$/p;/^layout/,$p' | grep -v "^ *$" | cut -c1-120; rc=$((rc | PIPESTATUS[0]))
    if [ "${PROFILE_BF16:-1}" = 1 ]; then
      python3 bench/parallel_profile.py --shape llama-380m --seq 1024 --global-batch 32 --fp8 none --backend te \
        --layouts 1-half,ddp --out $R/parallel-bf16.json 2>&1 | quiet | tee $R/profile-bf16.log \
        | sed -n '/GPU time per step/,/^ *$/p;/^layout/,$p' | grep -v "^ *$" | cut -c1-120; rc=$((rc | PIPESTATUS[0]))
    fi ;;
  profile-attn)
    # bf16: one process with the whole batch, one with half (what each DDP worker runs), two DDP processes;
    # with TE's attention (and where its host time goes) and with the torch backend's SDPA
    python3 bench/parallel_profile.py --shape llama-380m --seq 1024 --global-batch 32 --fp8 none --backend te \
      --layouts 1,1-half,ddp --host-breakdown FusedAttnFunc --out $R/parallel-te.json 2>&1 | quiet \
      | tee $R/profile-te.log | grep -E "host time inside|fused_attn_(fwd|bwd) of|^layout|^1 |^1-half|^ddp" | cut -c1-100; rc=$((rc | PIPESTATUS[0]))
    python3 bench/parallel_profile.py --shape llama-380m --seq 1024 --global-batch 32 --fp8 none --backend torch \
      --layouts 1,1-half,ddp --out $R/parallel-torch.json 2>&1 | quiet | tee $R/profile-torch.log \
      | grep -E "^layout|^1 |^1-half|^ddp"; rc=$((rc | PIPESTATUS[0])) ;;
  attention-host)
    python3 bench/attention_host.py --out $R/attention_host.json 2>&1 | quiet | tee $R/attention-host.log | tail -14; rc=$((rc | PIPESTATUS[0])) ;;
  profile-step)
    # with the host one step ahead, then without (--no-ahead): an A/B of pipeline.train.loop.Steps on one machine
    python3 bench/parallel_profile.py --shape llama3.1-8b --layers 8 --seq 4096 --global-batch 2 --layouts 1 \
      --fp8 delayed --out $R/step.json "$@" 2>&1 | quiet | tee $R/profile-step.log | grep -A8 "GPU time per step\|^layout"; rc=$((rc | PIPESTATUS[0]))
    python3 bench/parallel_profile.py --shape llama3.1-8b --layers 8 --seq 4096 --global-batch 2 --layouts 1 \
      --fp8 delayed --no-ahead --out $R/step-no-ahead.json "$@" 2>&1 | quiet | tee $R/profile-step-no-ahead.log \
      | grep -A8 "GPU time per step\|^layout"; rc=$((rc | PIPESTATUS[0])) ;;
  layer-kernels)
    for fp8 in delayed none; do
      python3 bench/layer_kernels.py --fp8 $fp8 --out $R/layer-kernels-$fp8.json 2>&1 | quiet | tee $R/layer-kernels-$fp8.log \
        | sed -n '/^NVIDIA/,$p'; rc=$((rc | PIPESTATUS[0]))
    done ;;
  step-kernels)
    python3 bench/train_step.py --shape llama3.1-8b --layers 8 --seq 4096 --batch 2 --steps 10 --profile-steps 2 \
      --variants hf,fp8_delayed,fp8_delayed_fp8head --out $R/step-kernels.json "$@" 2>&1 | quiet \
      | tee $R/step-kernels.log | sed -n '/^NVIDIA/,$p'; rc=$((rc | PIPESTATUS[0])) ;;
  matrix)
    python3 bench/matrix.py --out $R/matrix "$@"; rc=$? ;;
  peers)
    shapes=${1:?usage: run.sh peers 8b-4096|1b-2048|8b-256[,...] [matrix args]}; shift
    python3 - <<'PY'
import importlib.metadata as m
def version(p):
    try:
        return m.version(p)
    except m.PackageNotFoundError:
        return "not installed"
print(*(f"{p} {version(p)}" for p in ("liger-kernel", "torchao", "accelerate", "transformer-engine")))
PY
    python3 bench/matrix.py --only "peers-${shapes//,/,peers-}" --budget-s 560 --out $R/matrix "$@"; rc=$? ;;
  quality)
    python3 bench/finetune_quality.py "$@" 2>&1 | quiet | tee $R/quality.log; rc=$((rc | PIPESTATUS[0])) ;;
  job-8b)
    phase=${1:?usage: run.sh job-8b plan|base|job|report [args]}; shift
    python3 -u bench/job_8b.py --phase "$phase" "$@" 2>&1 | grep -v "it/s\]\|Warning\|warn(" \
      | tee -a $R/job-8b-$phase.log; rc=$((rc | PIPESTATUS[0])) ;;
  master-cost)
    for m in bf16 fp32 bf16_kahan bf16_sr; do
      python3 bench/train_step.py --shape llama3.1-8b --layers 32 --batch 2 --seq 4096 --steps 10 \
        --variants fp8_delayed --master-weights $m --out $R/8b-master-$m.json "$@" 2>&1 | quiet \
        | tee $R/8b-master-$m.log | sed -n '/^NVIDIA/,$p'; rc=$((rc | PIPESTATUS[0]))
    done
    python3 -m pytest tests/unit/test_optim.py tests/unit/test_master_weights.py -m gpu -s -q -p no:cacheprovider -o addopts="" 2>&1 \
      | quiet | tee $R/optim-tests.log | grep "passed\|failed\|Error\|^FAILED" | tail -8; rc=$((rc | PIPESTATUS[0])) ;;
  moments-fp8)
    python3 -m pytest tests/unit/test_moments_fp8.py -m gpu -s -q -p no:cacheprovider -o addopts="" 2>&1 | quiet \
      | tee $R/moments-fp8-tests.log | grep "share of equal\|passed\|failed\|Error\|^FAILED" | tail -8; rc=$((rc | PIPESTATUS[0]))
    python3 bench/update_kernel.py --master-weights bf16_kahan,bf16_kahan8 --out $R/update-kernel.json 2>&1 | quiet \
      | tee $R/update-kernel.log | sed -n '/^NVIDIA/,$p'; rc=$((rc | PIPESTATUS[0]))
    python3 bench/finetune_quality.py --pretrain-steps 300 --finetune-steps 150 --max-mb 16 --lrs 1e-5,2e-5,1e-4 \
      --variants hf_fp32_master,fp8_delayed_bf16_kahan_fp8head,fp8_delayed_bf16_kahan8_fp8head,fp8_delayed_bf16_kahan_fp8head_moments_fp8,fp8_delayed_bf16_kahan8_fp8head_moments_fp8,fp8_delayed_bf16_kahan_fp8head_fastacc 2>&1 | quiet \
      | tee $R/quality-moments-fp8.log | sed -n '/^held-out loss on B/,$p'; rc=$((rc | PIPESTATUS[0])) ;;
  sr-cost)
    python3 -m pytest tests/unit/test_optim.py tests/unit/test_master_weights.py tests/unit/test_moments_fp8.py -m gpu -s -q \
      -p no:cacheprovider -o addopts="" 2>&1 | quiet | tee $R/sr-tests.log | grep "passed\|failed\|Error\|^FAILED" | tail -6
    rc=$((rc | PIPESTATUS[0]))
    python3 bench/update_kernel.py --master-weights bf16,bf16_sr,bf16_kahan --out $R/update-kernel.json 2>&1 | quiet \
      | tee $R/update-kernel.log | sed -n '/^NVIDIA/,$p'; rc=$((rc | PIPESTATUS[0]))
    python3 bench/train_step.py --shape llama3.1-8b --layers 32 --batch 2 --seq 4096 --steps 8 --master-weights bf16_kahan \
      --variants hf,fp8_delayed_fp8head_fastacc_nearest,fp8_delayed_fp8head_fastacc_sr,fp8_delayed_fp8head_fastacc \
      --out $R/8b-sr.json "$@" 2>&1 | quiet | tee $R/8b-sr.log | sed -n '/^NVIDIA/,$p'; rc=$((rc | PIPESTATUS[0])) ;;
  fast-accum)
    for shape in "llama3.1-8b --layers 32 --batch 2 --seq 4096 --steps 8" "llama3.2-1b --layers 16 --batch 4 --seq 2048 --steps 15"; do
      python3 bench/train_step.py --shape $shape --master-weights bf16_kahan \
        --variants hf,fp8_delayed_fp8head,fp8_delayed_fp8head_fastacc,fp8_delayed_fp8head_fastacc_headfast \
        --out $R/fast-accum-${shape%% *}.json "$@" 2>&1 | quiet | tee $R/fast-accum-${shape%% *}.log | sed -n '/^NVIDIA/,$p'
      rc=$((rc | PIPESTATUS[0]))
    done
    python3 -m pytest tests/gpu/test_te.py tests/unit/test_ce_kernel.py -m gpu -s -q -p no:cacheprovider -o addopts="" \
      -k "fast_accumulation or fp8_head_on_gpu" 2>&1 | quiet | tee $R/fast-accum-tests.log | grep "fast accumulation:\|passed\|failed\|Error\|^FAILED" | tail -4
    rc=$((rc | PIPESTATUS[0]))
    python3 bench/finetune_quality.py --vocab 128256 --pretrain-steps 300 --finetune-steps 150 --max-mb 16 --lrs 1e-5,2e-5,1e-4 \
      --variants hf_fp32_master,fp8_delayed_bf16_kahan_fp8head_fastacc,fp8_delayed_bf16_kahan_fp8head_fastacc_headfast 2>&1 \
      | quiet | tee $R/quality-head-fast.log | sed -n '/^held-out loss on B/,$p'; rc=$((rc | PIPESTATUS[0])) ;;
  kernel-norm)
    python3 -m pytest tests/unit/test_grad_norm.py tests/unit/test_fp8_kernels.py tests/unit/test_ce_kernel.py \
      tests/gpu/test_swiglu.py tests/gpu/test_bench.py -m gpu -s -q -p no:cacheprovider -o addopts="" \
      -k "gpu_at_llama or test_fp8_kernels or fp8_head or test_swiglu or fp8_transpose or grad_norm_bench" 2>&1 | quiet | tee $R/kernel-norm-tests.log | grep "passed\|failed\|Error\|^FAILED" | tail -4
    rc=$((rc | PIPESTATUS[0]))
    for shape in llama3.2-1b llama3.1-8b; do
      python3 bench/grad_norm.py --shape $shape --out $R/grad-norm-$shape.json 2>&1 | quiet | sed -n '/^NVIDIA/,$p'
      rc=$((rc | PIPESTATUS[0]))
    done
    python3 $one --out $R/kernel-norm-1b-a.json \
      --variants hf,fp8_delayed_fp8head_fastacc,fp8_delayed_fp8head_fastacc_kernel_norm "$@" 2>&1 | show 1b-a
    rc=$((rc | PIPESTATUS[0]))
    python3 $one --out $R/kernel-norm-1b-b.json \
      --variants hf,fp8_delayed_fp8head_fastacc_kernel_norm,fp8_delayed_fp8head_fastacc "$@" 2>&1 | show 1b-b
    rc=$((rc | PIPESTATUS[0]))
    # the short parts first: a call cut off by its time limit still brings them back
    for shape in llama3.2-1b llama3.1-8b; do
      python3 bench/fp8_transpose.py --shape $shape --out $R/fp8-transpose-$shape.json 2>&1 | quiet | sed -n '/^NVIDIA/,$p'
      rc=$((rc | PIPESTATUS[0]))
    done
    python3 $eight --out $R/kernel-norm-8b.json \
      --variants hf,fp8_delayed_fp8head_fastacc,fp8_delayed_fp8head_fastacc_kernel_norm "$@" 2>&1 | show 8b
    rc=$((rc | PIPESTATUS[0])) ;;
  fused-rope)
    python3 -m pytest tests/unit/test_rope_kernels.py tests/gpu/test_te.py -m gpu -s -q -p no:cacheprovider -o addopts="" \
      -k "rope or decoder_graphs" 2>&1 | quiet | tee $R/fused-rope-tests.log | grep "RoPE\|passed\|failed\|Error\|^FAILED" | tail -12
    rc=$((rc | PIPESTATUS[0]))
    ab --variants hf,fp8_delayed_fp8head_fastacc_tes_rope,fp8_delayed_fp8head_fastacc,fp8_delayed_fp8head_fastacc_tes_rope_graphs,fp8_delayed_fp8head_fastacc_graphs \
      --variants hf,fp8_delayed_fp8head_fastacc_tes_rope,fp8_delayed_fp8head_fastacc "$@" ;;
  final-norm)
    python3 -m pytest tests/gpu/test_te.py -m gpu -s -q -p no:cacheprovider -o addopts="" \
      -k "final_norm or never_waits or matches_hf_in_bf16" 2>&1 | quiet | tee $R/final-norm-tests.log \
      | grep "final norm,\|passed\|failed\|Error\|^FAILED" | tail -12; rc=$((rc | PIPESTATUS[0]))
    ab --variants hf,fp8_delayed_fp8head_fastacc_hf_norm,fp8_delayed_fp8head_fastacc,fp8_delayed_fp8head_fastacc_graphs,fp8_delayed_fp8head_fastacc_hf_norm_graphs \
      --variants hf,fp8_delayed_fp8head_fastacc_hf_norm,fp8_delayed_fp8head_fastacc "$@" ;;
  fp8-from-update)
    python3 -m pytest tests/gpu/test_te.py -m gpu -s -q -p no:cacheprovider -o addopts="" \
      -k "fp8_weights_written" 2>&1 | quiet | tee $R/fp8-from-update-tests.log \
      | grep "written by the update,\|passed\|failed\|Error\|^FAILED" | tail -8; rc=$((rc | PIPESTATUS[0]))
    # the host's cost of TE's cached FP8 weights against casting them at every call
    python3 bench/fp8_cache_host.py --cprofile 12 --out $R/fp8-cache-host.json 2>&1 | quiet \
      | tee $R/fp8-cache-host.log | sed -n '/^NVIDIA/,$p'; rc=$((rc | PIPESTATUS[0]))
    # short rows without accumulation beside HF, then with 4 micro-batches a step (casting at every one too;
    # the default, TE's cache, first and last)
    python3 bench/train_step.py --shape llama3.1-8b --layers 32 --batch 8 --seq 256 --steps 10 --master-weights bf16_kahan \
      --variants hf,fp8_delayed_fp8head_fastacc,fp8_delayed_fp8head_fastacc_fp8_from_update \
      --out $R/fp8-from-update-8x256.json "$@" 2>&1 | quiet | tee $R/fp8-from-update-8x256.log \
      | sed -n '/^NVIDIA/,$p'; rc=$((rc | PIPESTATUS[0]))
    python3 bench/train_step.py --shape llama3.1-8b --layers 32 --batch 8 --seq 256 --micro-batches 4 --steps 10 \
      --master-weights bf16_kahan --variants \
      fp8_delayed_fp8head_fastacc,fp8_delayed_fp8head_fastacc_recast,fp8_delayed_fp8head_fastacc_fp8_from_update,fp8_delayed_fp8head_fastacc \
      --out $R/fp8-from-update-8x256-m4.json "$@" 2>&1 | quiet | tee $R/fp8-from-update-8x256-m4.log \
      | sed -n '/^NVIDIA/,$p'; rc=$((rc | PIPESTATUS[0]))
    [ -n "${SKIP_LONG:-}" ] || { python3 $eight --variants hf,fp8_delayed_fp8head_fastacc,fp8_delayed_fp8head_fastacc_fp8_from_update \
      --out $R/fp8-from-update-8b.json "$@" 2>&1 | show 8b; rc=$((rc | PIPESTATUS[0])); } ;;
  dswiglu-t)
    # the SwiGLU gradient's transpose written by its one-pass kernel against copied after it: the kernel's GPU
    # tests, the 1B step (eager and graphed), then the 8B step (args, e.g. --layers 16 on an H100) beside HF
    # and the FP8 weights written by the update, the default first and last
    python3 -m pytest tests/gpu/test_swiglu.py -m gpu -s -q -p no:cacheprovider -o addopts="" 2>&1 | quiet \
      | tee $R/dswiglu-t-tests.log | grep "off a single\|passed\|failed\|Error\|^FAILED\|assert" | tail -8
    rc=$((rc | PIPESTATUS[0]))
    ab --variants hf,fp8_delayed_fp8head_fastacc,fp8_delayed_fp8head_fastacc_dswiglu_t,fp8_delayed_fp8head_fastacc_graphs,fp8_delayed_fp8head_fastacc_dswiglu_t_graphs \
      --variants hf,fp8_delayed_fp8head_fastacc,fp8_delayed_fp8head_fastacc_dswiglu_t,fp8_delayed_fp8head_fastacc_fp8_from_update,fp8_delayed_fp8head_fastacc_dswiglu_t_fp8_from_update,fp8_delayed_fp8head_fastacc,fp8_delayed_fp8head_fastacc_dswiglu_t \
      "$@" ;;
  fp8-cache)
    # TE's first-micro-batch cache of the FP8 weights in the eager loop: the GPU tests of the loop with
    # gradient accumulation (eager and graphed), then the step with micro-batches, casting at every call
    # against the cache (and the update's copies), each twice, alternating: 8 layers of 4 x 2 x 1024, then
    # 32 layers (args, e.g. --layers 16 on an H100) of 8 x 8 x 256
    python3 -m pytest tests/gpu/test_graphs.py -m gpu -s -q -p no:cacheprovider -o addopts="" -k "eager_layers_do or once_a_step" \
      2>&1 | quiet | tee $R/fp8-cache-tests.log | grep "micro-batch\|passed\|failed\|Error\|^FAILED" | tail -8
    rc=$((rc | PIPESTATUS[0]))
    python3 bench/train_step.py --shape llama3.1-8b --layers 8 --batch 2 --seq 1024 --micro-batches 4 --steps 6 \
      --master-weights bf16_kahan --out $R/fp8-cache-2x1024.json --variants \
      fp8_delayed_fp8head_fastacc_recast,fp8_delayed_fp8head_fastacc,fp8_delayed_fp8head_fastacc_recast,fp8_delayed_fp8head_fastacc \
      2>&1 | quiet \
      | tee $R/fp8-cache-2x1024.log | sed -n '/^NVIDIA/,$p'; rc=$((rc | PIPESTATUS[0]))
    python3 bench/train_step.py --shape llama3.1-8b --layers 32 --batch 8 --seq 256 --micro-batches 8 --steps 6 \
      --warmup 2 --master-weights bf16_kahan --variants \
      fp8_delayed_fp8head_fastacc_recast,fp8_delayed_fp8head_fastacc,fp8_delayed_fp8head_fastacc_fp8_from_update,fp8_delayed_fp8head_fastacc_recast,fp8_delayed_fp8head_fastacc \
      --out $R/fp8-cache-8x256-m8.json "$@" 2>&1 | quiet | tee $R/fp8-cache-8x256-m8.log | sed -n '/^NVIDIA/,$p'
    rc=$((rc | PIPESTATUS[0])) ;;
  memory-8b)
    python3 bench/train_step.py --shape llama3.1-8b --layers 32 --batch 2 --seq 4096 --steps 8 --master-weights bf16_kahan \
      --variants hf,fp8_delayed_fp8head,fp8_delayed_fp8head_kahan8,fp8_delayed_fp8head_bwdcast_moments_fp8,fp8_delayed_fp8head_bwdcast_moments_fp8_kahan8,fp8_delayed_fp8head_recompute_mlp_moments_fp8 \
      --out $R/8b-memory.json "$@" 2>&1 | quiet | tee $R/8b-memory.log | sed -n '/^NVIDIA/,$p'; rc=$((rc | PIPESTATUS[0]))
    # the 80 GB preset's step (configs/llama3.1-8b-fp8-h100.yaml) with the allocator held to an H100's memory
    python3 bench/train_step.py --shape llama3.1-8b --layers 32 --batch 2 --seq 4096 --steps 4 --warmup 2 \
      --master-weights bf16_kahan --variants fp8_delayed_fp8head_bwdcast_moments_fp8_fastacc_kahan8 --memory-cap-gib 78.5 \
      --out $R/8b-memory-h100-cap.json 2>&1 | quiet | tee $R/8b-memory-h100-cap.log | sed -n '/^NVIDIA/,$p'; rc=$((rc | PIPESTATUS[0]))
    python3 -m pytest tests/gpu/test_te.py tests/unit/test_moments_fp8.py -m gpu -s -q -p no:cacheprovider -o addopts="" \
      -k "cast_again or recompute or moments" 2>&1 | quiet | tee $R/memory-tests.log \
      | grep "FP8 weights cast again\|MLP recompute,\|share of equal\|passed\|failed\|Error\|^FAILED" | tail -10; rc=$((rc | PIPESTATUS[0])) ;;
  update-launch)
    python3 bench/update_kernel.py --master-weights bf16_kahan,bf16_sr --steps 40 --fp8-launch 1024x4,2048x8 \
      --launch 4096x8,8192x8,8192x16,16384x16,2048x4,4096x4,2048x8,1024x4 --out $R/update-launch.json 2>&1 | quiet \
      | tee $R/update-launch.log | sed -n '/^NVIDIA/,$p'; rc=$((rc | PIPESTATUS[0]))
    pipeline=$(python3 -c "from pipeline.train import optim; print(f'{optim.BLOCK}x{optim.WARPS}')")
    best=$(python3 -c "
import json
rows = [r for r in json.load(open('$R/update-launch.json'))['variants']
        if r.get('master_weights') == 'bf16_kahan' and not r['moments_fp8']]
print('x'.join(map(str, min(rows, key=lambda r: r['ms'])['launch'])))")
    if [ "$best" = "$pipeline" ]; then
      echo "the pipeline's $pipeline is the fastest bf16_kahan update: no step to compare"
    else
      for i in 1 2; do
        for launch in $pipeline $best; do
          python3 bench/train_step.py --shape llama3.1-8b --layers 32 --batch 2 --seq 4096 --steps 10 \
            --master-weights bf16_kahan --variants fp8_delayed_fp8head_fastacc --update-launch $launch \
            --out $R/8b-launch-$launch-$i.json "$@" 2>&1 | quiet > $R/8b-launch-$launch-$i.log; rc=$((rc | PIPESTATUS[0]))
          step_line $R/8b-launch-$launch-$i.json "8B step, update programs $launch, run $i"
        done
      done
    fi ;;
  norm-cudnn)
    for shape in "llama3.2-1b --layers 16 --batch 4 --seq 2048 --steps 15 --profile-steps 2" \
                 "llama3.1-8b --layers 32 --batch 2 --seq 4096 --steps 8 --profile-steps 1"; do
      for i in 1 2; do
        for norms in te cudnn; do
          flag=0; [ $norms = cudnn ] && flag=1; name=norm-${shape%% *}-$norms-$i
          NVTE_NORM_FWD_USE_CUDNN=$flag python3 bench/train_step.py --shape $shape --master-weights bf16_kahan \
            --variants fp8_delayed_fp8head_fastacc --out $R/$name.json "$@" 2>&1 | quiet > $R/$name.log; rc=$((rc | PIPESTATUS[0]))
          step_line $R/$name.json "${shape%% *}, $norms norms, run $i" norm cast/transpose/amax "gemm fp8" attention \
            || tail -5 $R/$name.log
        done
      done
    done ;;
  goals)
    eight_shape="--shape llama3.1-8b --layers 32 --batch 2 --seq 4096"
    python3 bench/step_floor.py $eight_shape --gemms fp8 --out $R/goals-floor.json 2>&1 | quiet \
      | tee $R/goals-floor.log | sed -n '/^NVIDIA/,$p'; rc=$((rc | PIPESTATUS[0]))
    python3 bench/train_step.py $eight_shape --steps 8 --warmup 3 --master-weights bf16_kahan \
      --variants hf,hf_liger,hf_torchao_fp8,accelerate_te_fp8,te_llama_swap,fp8_delayed_fp8head_fastacc \
      --out $R/goals-steps.json "$@" 2>&1 | quiet | tee $R/goals-steps.log | sed -n '/^NVIDIA/,$p'; rc=$((rc | PIPESTATUS[0]))
    echo; python3 bench/goal_budget.py --floor $R/goals-floor.json --steps $R/goals-steps.json; rc=$((rc | $?)) ;;
  floor)
    python3 -m pytest tests/gpu/test_step_floor.py -m gpu -q -p no:cacheprovider -o addopts="" 2>&1 | quiet \
      | tee $R/floor-tests.log | grep "passed\|failed\|skipped\|Error\|^FAILED" | tail -4; rc=$((rc | PIPESTATUS[0]))
    for gemms in fp8 bf16; do
      python3 bench/step_floor.py --shape llama3.1-8b --layers 32 --batch 2 --seq 4096 --gemms $gemms \
        --out $R/floor-$gemms.json "$@" 2>&1 | quiet | tee $R/floor-$gemms.log | sed -n '/^NVIDIA/,$p'; rc=$((rc | PIPESTATUS[0]))
    done ;;
esac
status=$rc
[ -n "${OUT:-}" ] && tar czf "$OUT/results-$part.tgz" -C /tmp results
exit $status
