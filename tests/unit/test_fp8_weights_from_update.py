"""FP8 weights written by the update (`train.fp8_weights_from_update`): the optimizer's kernel writes each
covered weight's E4M3 codes as Transformer Engine's delayed-scaling cast would make them from the new weight.

The Triton kernel (through Triton's interpreter, in a fresh process) and its torch twin must both store the
codes torch's own cast makes of the stored bf16 weights, fold the weights' amax into the shared amax, write
1 / scale, leave all three alone on a skipped step, and tell the FP8 weights of each parameter written. The
TE side (`te_model.fp8_weights`) is tested on the GPU (tests/gpu/test_te.py).
"""

from __future__ import annotations

import textwrap

import pytest
import torch

from pipeline.train import optim
from tests.support.triton_interpreted import run_interpreted

SCRIPT = textwrap.dedent('''
    import json, torch
    from pipeline.train import optim

    class Copies:
        """Two weights that share one FP8 tensor, rows 0-47 and 48-63 (as TE's Q and K share one), and a vector."""
        def __init__(self, params, scale):
            self.params = params[:2]
            self.data = torch.zeros(64, 256, dtype=torch.float8_e4m3fn)
            self.scale, self.amax = torch.tensor([scale]), torch.zeros(1)
            self.scale_inv = torch.zeros(1)
            self.log = []
        def covers(self, p):
            return any(p is q for q in self.params)
        def target(self, p):
            rows = (0, 48) if p is self.params[0] else (48, 64)
            return optim.FP8Target(self.data[rows[0]:rows[1]], self.scale, self.amax, self.scale_inv)
        def written(self, p):
            self.log.append(0 if p is self.params[0] else 1)

    def run(mode, scale, triton):
        gen = torch.Generator().manual_seed(0)
        w = torch.randn(48, 256, generator=gen) * 0.02
        w[0, :64] = torch.linspace(-3e-6, 3e-6, 64)  # codes below E4M3's smallest normal under the larger scale
        params = [torch.nn.Parameter(w.to(torch.bfloat16)),
                  torch.nn.Parameter((torch.randn(16, 256, generator=gen) * 0.05).to(torch.bfloat16)),
                  torch.nn.Parameter(torch.ones(256, dtype=torch.bfloat16))]
        # every parameter under a million elements: only covered ones may leave torch's fused kernel
        opt = optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, master_weights=mode)
        if not triton:
            opt.triton_applies = lambda: False
        opt.fp8_weights = copies = Copies(params, scale)
        out = {"codes_match": [], "amax_match": [], "scale_inv_match": [], "saturated": 0, "subnormal": 0}
        for step in range(4):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
            copies.amax.zero_()  # as TE's amax update after each forward leaves it
            if step == 2:
                opt.found_inf = torch.ones(())
                before = (copies.data.clone(), copies.amax.clone(), copies.scale_inv.clone())
            opt.step()
            if step == 2:
                del opt.found_inf
                out["skipped"] = (torch.equal(copies.data.view(torch.uint8), before[0].view(torch.uint8))
                                  and torch.equal(copies.amax, before[1]) and torch.equal(copies.scale_inv, before[2]))
                continue
            weights = torch.cat([params[0].detach(), params[1].detach()]).float()
            expected = (weights * copies.scale).clamp(-448, 448).to(torch.float8_e4m3fn)
            out["codes_match"].append(torch.equal(copies.data.view(torch.uint8), expected.view(torch.uint8)))
            out["amax_match"].append(float(copies.amax) == float(weights.abs().max()))
            out["scale_inv_match"].append(float(copies.scale_inv) == float(1 / copies.scale))
            out["saturated"] += int((expected.float().abs() == 448).sum())
            out["subnormal"] += int(((expected.float().abs() < 2**-6) & (expected.float() != 0)).sum())
        out["written"] = copies.log
        out["applied"] = opt.triton_applies()
        return out

    results = {}
    for mode in ("bf16_kahan", "bf16_sr", "fp32", "bf16"):
        for scale in (448 / 0.05, 2.0 ** 13):  # the second: half the products fall exactly between two codes
            for triton in (True, False):
                results[f"{mode} {scale:g} {'kernel' if triton else 'twin'}"] = run(mode, scale, triton)
    print(json.dumps(results))
''')


def test_the_update_writes_the_codes_te_would_cast_from_the_new_weights():
    results = run_interpreted(SCRIPT)
    assert len(results) == 16
    for name, r in results.items():
        assert r["applied"] is name.endswith("kernel"), name
        assert r["codes_match"] == [True] * 3, (name, r)
        assert r["amax_match"] == [True] * 3 and r["scale_inv_match"] == [True] * 3, (name, r)
        assert r["skipped"], name
        assert r["written"] == [0, 1] * 4, name  # every step, skipped ones too: the copies are current
    # the larger scale saturates the largest weights and leaves the smallest below E4M3's normals
    assert all(r["saturated"] > 0 and r["subnormal"] > 0 for name, r in results.items() if " 8960 " in name)


def test_a_copy_of_the_wrong_kind_is_refused_by_name():
    p = torch.nn.Parameter(torch.zeros(4, 16, dtype=torch.bfloat16))
    p.grad = torch.ones_like(p)
    opt = optim.AdamW([p], master_weights="bf16_kahan")
    opt.triton_applies = lambda: False

    class Wrong:
        def covers(self, q):
            return True

        def target(self, q):
            one = torch.ones(1)
            return optim.FP8Target(torch.zeros(4, 16, dtype=torch.uint8), one, one, one)

        def written(self, q):
            pass

    opt.fp8_weights = Wrong()
    with pytest.raises(ValueError, match=r"the FP8 copy of a \(4, 16\) parameter is torch.uint8 \(4, 16\)"):
        opt.step()

