"""The update kernel's machine code for Hopper, counted on any machine: no GPU needed.

Triton compiles `pipeline/train/adamw_kernel.py` for sm_90 down to a cubin (through the ptxas its wheel
bundles), specialized as a launch on the 8B model's parameters is (16-byte aligned pointers, element
counts that are multiples of 16), and the cubin's SASS instructions are counted with the wheel's
cuobjdump. The kernel has no loops, so each thread issues each instruction at most once (a skipped step
returns early): instructions a thread / elements a thread is what the GPU issues per element. Where the update is bound by its arithmetic
(FP8 moments) that count, not its bytes, sets its time; it is a way to compare kernel variants before a
GPU run, never a timing (`bench/update_kernel.py` times the update).

    python bench/kernel_sass.py                    # every master-weight option, bf16 and FP8 moments
    python bench/kernel_sass.py --ops              # and the ten commonest instructions of each
    python bench/kernel_sass.py --fp8-weight       # and each writing the weight's FP8 copy too
    python bench/kernel_sass.py --dswiglu          # the SwiGLU gradient's FP8 cast, its transpose copied or
                                                   # written by the kernel, instead of the update

The counts depend on the Triton that compiles (the tables name it). To compile with another, e.g. the GPU
host's, put its wheel ahead of the installed one:

    pip install --no-deps --target /tmp/triton-3.6 triton==3.6.0
    PYTHONPATH=/tmp/triton-3.6 python bench/kernel_sass.py --dswiglu
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # fused multiply-adds, as Triton compiles on the GPU host

from pipeline.train import optim  # noqa: E402
from te_model.triton_kernels import interpreted  # noqa: E402

ARCH = 90  # Hopper
EXTRA = {"fp32": "fp32", "bf16_kahan": "bf16", "bf16_kahan8": "i8"}  # else the launch passes the parameter


def compile_update(mode: str, moments_fp8: bool, param: str = "bf16", fp8_weight: bool = False):
    """The update kernel compiled for sm_90 as `optim.AdamW` launches it for a `param` weight matrix: found_inf
    and a clipping factor given, the pipeline's program sizes; with `fp8_weight`, writing its FP8 copy too."""
    from pipeline.train import adamw_kernel

    fn = adamw_kernel.adamw_update
    block, warps = (optim.FP8_BLOCK, optim.FP8_WARPS) if moments_fp8 else (optim.BLOCK, optim.WARPS)
    moment = "fp8e4nv" if moments_fp8 else param
    pointers = {"p_ptr": param, "g_ptr": param, "m_ptr": moment, "v_ptr": moment,
                "extra_ptr": EXTRA.get(mode, param), "m_scale_ptr": "fp32", "v_scale_ptr": "fp32",
                "corrections_ptr": "fp32", "found_inf_ptr": "fp32", "factor_ptr": "fp32",
                "w8_ptr": "fp8e4nv" if fp8_weight else "fp32", "w8_scale_ptr": "fp32", "w8_amax_ptr": "fp32",
                "w8_scale_inv_ptr": "fp32"}
    scalars = {"n": "i64", "index": "i32", "stream": "i32", "lr": "fp32", "weight_decay": "fp32",
               "beta1": "fp32", "beta2": "fp32", "eps": "fp32"}
    constants = {"MODE": optim.KERNEL_MODE[mode], "HAS_FOUND_INF": True, "HAS_FACTOR": True,
                 "BF16": param == "bf16", "MOMENTS_FP8": moments_fp8, "FP8_WEIGHT": fp8_weight, "INTERPRETED": False,
                 "BLOCK": block, "QBLOCK": optim.QBLOCK}
    return compile_kernel(fn, pointers, scalars, constants, ["n"], warps), block // (32 * warps)


def compile_dswiglu(transpose: bool, dtype: str = "fp8e5"):
    """`te_model.swiglu_kernels`' cast compiled for sm_90 as a launch at a Llama MLP's width specializes it (bf16
    inputs, the E5M2 gradient), writing the transpose itself or not."""
    from te_model import swiglu_kernels

    pointers = {"g_ptr": "bf16", "x_ptr": "bf16", "q_ptr": dtype, "qt_ptr": dtype, "scale_ptr": "fp32",
                "scale_inv_ptr": "fp32", "amax_ptr": "fp32"}
    constants = {"ROWS": swiglu_kernels.ROWS, "COLS": swiglu_kernels.COLS, "TRANSPOSE": transpose}
    return compile_kernel(swiglu_kernels._kernel(), pointers, {"rows": "i32", "cols": "i32"}, constants,
                          ["rows", "cols"], swiglu_kernels.WARPS)


def compile_kernel(fn, pointers: dict, scalars: dict, constants: dict, divisible: list[str], warps: int):
    """`fn` compiled for sm_90 as the JIT specializes a launch: aligned pointers, the `divisible` scalars
    multiples of 16."""
    import triton
    from triton.backends.compiler import GPUTarget

    signature = {name: f"*{dtype}" for name, dtype in pointers.items()} | scalars
    signature |= {name: "constexpr" for name in constants}
    index = {name: (fn.arg_names.index(name),) for name in signature}
    attrs = {index[name]: [["tt.divisibility", 16]] for name in [*pointers, *divisible]}
    source = triton.compiler.ASTSource(fn=fn, signature=signature, attrs=attrs,
                                       constexprs={index[name]: value for name, value in constants.items()})
    return triton.compile(source, target=GPUTarget("cuda", ARCH, 32), options={"num_warps": warps})


def reload_after_barrier(ptx: str) -> bool | None:
    """Whether the first load that bypasses L1 (`ld.global.cg`: the kernel reading back what it stored) comes
    after a `bar.sync` that comes after every store before it, which makes those stores visible to the whole
    program; None where no load does."""
    last_store = barrier = -1
    for i, line in enumerate(ptx.splitlines()):
        if "ld.global.cg" in line:
            return last_store < barrier
        if "st.global" in line:
            last_store = i
        elif "bar.sync" in line:
            barrier = i
    return None


def compiler() -> str:
    """The Triton that compiles, which the counts depend on (the GPU host's may differ from this machine's)."""
    import triton

    return f"Triton {triton.__version__}"


def tool(name: str) -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name


def sass(cubin: bytes) -> list[str]:
    """The cubin's instructions, one string each (predicate and operands included)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        listing = subprocess.run([str(tool("cuobjdump")), "-sass", f.name], capture_output=True, text=True,
                                 check=True).stdout
    return [re.sub(r"^\s*/\*[0-9a-f]{4}\*/\s*", "", line).split(";")[0].strip()
            for line in listing.splitlines() if re.match(r"\s+/\*[0-9a-f]{4}\*/", line)]


def opcode(instruction: str) -> str:
    return re.sub(r"^@!?U?P[T\d]+\s+", "", instruction).split()[0].split(".")[0]


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--master-weights", default=",".join(m for m in optim.MASTER_WEIGHTS),
                   help="comma-separated options to compile")
    p.add_argument("--ops", action="store_true", help="also the ten commonest instructions of each")
    p.add_argument("--fp8-weight", action="store_true",
                   help="also each kernel writing the weight's FP8 copy (train.fp8_weights_from_update)")
    p.add_argument("--dswiglu", action="store_true",
                   help="the SwiGLU gradient's FP8 cast instead, its transpose copied after it or written by it")
    p.add_argument("--out", help="write the rows as JSON here")
    args = p.parse_args(argv)
    if interpreted():
        p.error("TRITON_INTERPRET=1 runs kernels in Python: unset it to compile them")
    rows = dswiglu_rows(args.ops) if args.dswiglu else update_rows(p, args)
    if args.out:
        Path(args.out).write_text(json.dumps([row | {"compiler": compiler()} for row in rows], indent=1))
    return rows


READS_BACK = {None: "-", True: "yes", False: "NO"}


def dswiglu_rows(ops: bool) -> list[dict]:
    from te_model import swiglu_kernels

    rows = []
    outputs = 2 * swiglu_kernels.ROWS * swiglu_kernels.COLS // (32 * swiglu_kernels.WARPS)  # FP8 elements a thread
    print(f"SwiGLU gradient cast, sm_{ARCH} SASS ({compiler()}), a program of {swiglu_kernels.ROWS} x {swiglu_kernels.COLS}, "
          f"{swiglu_kernels.WARPS} warps")
    print(f"{'transpose':10s} {'instructions':>12s} {'per element':>12s} {'shared B':>9s} reloads after a barrier")
    for transpose in (False, True):
        compiled = compile_dswiglu(transpose)
        instructions = sass(compiled.asm["cubin"])
        row = {"transpose_in_kernel": transpose, "instructions": len(instructions),
               "per_element": len(instructions) / outputs, "shared_bytes": compiled.metadata.shared,
               "reloads_after_barrier": reload_after_barrier(compiled.asm["ptx"]),
               "ops": collections.Counter(map(opcode, instructions)).most_common(10)}
        rows.append(row)
        print(f"{'kernel' if transpose else 'copied':10s} {row['instructions']:12d} {row['per_element']:12.1f} "
              f"{row['shared_bytes']:9d} {READS_BACK[row['reloads_after_barrier']]}")
        if ops:
            print("    " + ", ".join(f"{op} {n}" for op, n in row["ops"]))
    return rows


def update_rows(p, args) -> list[dict]:
    rows = []
    for mode in args.master_weights.split(","):
        if mode not in optim.KERNEL_MODE:
            p.error(f"--master-weights: {mode!r} is not one of {', '.join(optim.MASTER_WEIGHTS)}")
        for moments_fp8 in (False, True):
            for fp8_weight in (False, True) if args.fp8_weight else (False,):
                compiled, per_thread = compile_update(mode, moments_fp8, fp8_weight=fp8_weight)
                instructions = sass(compiled.asm["cubin"])
                rows.append({"master_weights": mode, "moments_fp8": moments_fp8, "fp8_weight": fp8_weight,
                             "instructions": len(instructions), "elements_a_thread": per_thread,
                             "per_element": len(instructions) / per_thread,
                             "ops": collections.Counter(map(opcode, instructions)).most_common(10)})
    print(f"update kernel, sm_{ARCH} SASS ({compiler()}, bf16 weights)")
    print(f"{'master weights':16s} {'moments':8s} {'FP8 copy':8s} {'instructions':>12s} {'a thread':>9s} "
          f"{'per element':>12s}")
    for row in rows:
        print(f"{row['master_weights']:16s} {'FP8' if row['moments_fp8'] else 'bf16':8s} "
              f"{'yes' if row['fp8_weight'] else 'no':8s} {row['instructions']:12d} "
              f"{row['elements_a_thread']:9d} {row['per_element']:12.1f}")
        if args.ops:
            print("    " + ", ".join(f"{op} {n}" for op, n in row["ops"]))
    return rows


if __name__ == "__main__":
    main()
