"""The update kernel compiled for Hopper (sm_90) on a machine without a GPU: Triton's own compiler down to
a cubin, through the ptxas its wheel bundles, in every mode the optimizer launches. The interpreter runs the
kernel's math in Python; this catches what only the GPU's compiler would refuse."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

COMPILE = '''
import json, triton
from triton.backends.compiler import GPUTarget
from pipeline.train import adamw_kernel, optim

fn = adamw_kernel.adamw_update
EXTRA = {"fp32": "*fp32", "bf16_kahan": "*bf16", "bf16_kahan8": "*i8"}  # else the parameter itself
out = {}
for mode, code in optim.KERNEL_MODE.items():
    for param in ("bf16", "fp32") if mode == "bf16" else ("bf16",):
        for fp8 in (False, True):
            block, warps = (optim.FP8_BLOCK, optim.FP8_WARPS) if fp8 else (optim.BLOCK, 8)
            moment = "*fp8e4nv" if fp8 else f"*{param}"
            signature = {"p_ptr": f"*{param}", "g_ptr": f"*{param}", "m_ptr": moment, "v_ptr": moment,
                         "extra_ptr": EXTRA.get(mode, f"*{param}"), "m_scale_ptr": "*fp32", "v_scale_ptr": "*fp32",
                         "n": "i64", "corrections_ptr": "*fp32", "index": "i32", "stream": "i32",
                         "found_inf_ptr": "*fp32", "factor_ptr": "*fp32", "lr": "fp32", "weight_decay": "fp32",
                         "beta1": "fp32", "beta2": "fp32", "eps": "fp32"}
            constants = {"MODE": code, "HAS_FOUND_INF": True, "HAS_FACTOR": True, "BF16": param == "bf16",
                         "MOMENTS_FP8": fp8, "BLOCK": block, "QBLOCK": optim.QBLOCK}
            signature |= {name: "constexpr" for name in constants}
            source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs={
                (fn.arg_names.index(name),): value for name, value in constants.items()})
            compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
            out[f"{mode} {param}" + (" fp8 moments" if fp8 else "")] = len(compiled.asm["cubin"])
print(json.dumps(out))
'''


def test_the_update_kernel_compiles_for_hopper_in_every_mode():
    triton = pytest.importorskip("triton")
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this Triton wheel bundles no ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env |= {"PYTHONPATH": str(REPO), "TRITON_DEFAULT_FP_FUSION": "1"}  # fused multiply-adds, as on the GPU
    done = subprocess.run([sys.executable, "-c", COMPILE], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    sizes = json.loads(done.stdout.strip().splitlines()[-1])
    from pipeline.train import optim

    assert len(sizes) == 2 * (len(optim.KERNEL_MODE) + 1), sizes
    assert all(size > 0 for size in sizes.values()), sizes
