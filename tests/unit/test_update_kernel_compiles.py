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

COMPILE = """
import json
from bench import kernel_sass
from pipeline.train import optim

sizes = {}
for mode in optim.KERNEL_MODE:
    for param in ("bf16", "fp32") if mode == "bf16" else ("bf16",):
        for fp8 in (False, True):
            compiled, _ = kernel_sass.compile_update(mode, fp8, param)
            sizes[f"{mode} {param}" + (" fp8 moments" if fp8 else "")] = len(compiled.asm["cubin"])
print(json.dumps(sizes))
"""


def test_the_update_kernel_compiles_for_hopper_in_every_mode():
    triton = pytest.importorskip("triton")
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this Triton wheel bundles no ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env |= {"PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", COMPILE], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    sizes = json.loads(done.stdout.strip().splitlines()[-1])
    from pipeline.train import optim

    assert len(sizes) == 2 * (len(optim.KERNEL_MODE) + 1), sizes
    assert all(size > 0 for size in sizes.values()), sizes


def test_the_instruction_count_bench_counts_each_option(capsys):
    """`bench/kernel_sass.py`: a row per option and moment kind, instructions a thread over its elements; the
    one-byte compensation costs more instructions than the bf16 one (its codes are rounded stochastically)."""
    triton = pytest.importorskip("triton")
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").exists():
        pytest.skip("this Triton wheel bundles no cuobjdump")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("kernels are interpreted in this process")
    from bench import kernel_sass

    rows = kernel_sass.main(["--master-weights", "bf16_kahan,bf16_kahan8", "--ops"])
    assert [(r["master_weights"], r["moments_fp8"]) for r in rows] == [
        ("bf16_kahan", False), ("bf16_kahan", True), ("bf16_kahan8", False), ("bf16_kahan8", True)]
    for row in rows:
        assert row["per_element"] == row["instructions"] / row["elements_a_thread"] > 10, row
        assert "STG" in dict(row["ops"]) or "FMUL" in dict(row["ops"]), row  # SASS opcodes, counted
    assert rows[2]["per_element"] > rows[0]["per_element"] and rows[3]["per_element"] > rows[1]["per_element"]
    assert "bf16_kahan8      FP8" in capsys.readouterr().out


def test_the_swiglu_cast_reads_back_its_own_tile_only_after_a_barrier(capsys):
    """`bench/kernel_sass.py --dswiglu`: the SwiGLU gradient's FP8 cast compiles for sm_90 both ways, and the
    kernel that writes the transpose itself reads its stored tile back after a barrier behind those stores."""
    triton = pytest.importorskip("triton")
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").exists():
        pytest.skip("this Triton wheel bundles no cuobjdump")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("kernels are interpreted in this process")
    from bench import kernel_sass

    copied, written = kernel_sass.main(["--dswiglu"])
    assert (copied["transpose_in_kernel"], written["transpose_in_kernel"]) == (False, True)
    assert copied["reloads_after_barrier"] is None and written["reloads_after_barrier"] is True
    assert written["shared_bytes"] > copied["shared_bytes"]  # the transpose goes through shared memory
    assert written["instructions"] > copied["instructions"] > 0
    assert "kernel" in capsys.readouterr().out


def test_the_barrier_check_finds_a_reload_that_races_its_stores():
    from bench import kernel_sass

    store, barrier, reload = "st.global.v4.b32 [%rd1], {%r1};", "bar.sync 0;", "ld.global.cg.v4.b32 {%r2}, [%rd1];"
    assert kernel_sass.reload_after_barrier("\n".join([store, barrier, reload])) is True
    assert kernel_sass.reload_after_barrier("\n".join([barrier, store, reload])) is False
    assert kernel_sass.reload_after_barrier("\n".join([store, barrier])) is None
