"""Master weights (`train.master_weights`, pipeline/train/optim.py): do small fine-tuning updates survive bf16?

The update-fidelity experiment: bf16 weights drawn like a Llama init (std 0.02) take 100 AdamW steps of
small, consistent gradients at lr 1e-5, and the same steps run in fp32. The default option must keep at
least 0.95 of the fp32 update's norm with a relative error of at most 0.1; rounding each update to nearest
(`bf16`) must fail that. Both the plain-torch path (CPU) and the Triton kernel (under Triton's
interpreter, on fewer elements) are measured, and the two must draw the same stochastic roundings. A
resume from a checkpoint continues bit for bit under every option.
"""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

import te_model
from pipeline.train import checkpoint as ckpt
from pipeline.train import optim
from pipeline import demo
from pipeline.config import Config
from tests.support.optimizer_files import through_checkpoint_files
from tests.support.triton_interpreted import run_interpreted

LR, STEPS, SPREAD = 1e-5, 100, 0.02
MIN_NORM_RATIO, MAX_RELATIVE_ERROR = 0.95, 0.1
DEFAULT = Config().train.master_weights

FIDELITY = '''
import json, sys, torch
from pipeline.train import optim

def fidelity(mode, n, lr, steps, seed=0):
    """(fraction of weights that moved, |update| / |fp32 update|, |update - fp32 update| / |fp32 update|)."""
    gen = torch.Generator().manual_seed(seed)
    start = (torch.randn(n, generator=gen) * 0.02).to(torch.bfloat16)
    direction = torch.randn(n, generator=gen) * 1e-3  # consistent over steps, a little noise on top
    ours, exact = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.float())
    optimizer = optim.AdamW([ours], lr=lr, betas=(0.9, 0.95), weight_decay=0.1, master_weights=mode,
                            triton_min_numel=1)
    reference = torch.optim.AdamW([exact], lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    for _ in range(steps):
        grad = (direction * (1 + 0.1 * torch.randn(n, generator=gen))).to(torch.bfloat16)
        ours.grad, exact.grad = grad, grad.float()
        optimizer.step()
        reference.step()
    update, wanted = ours.detach().double() - start.double(), exact.detach().double() - start.double()
    return {"moved": float((update != 0).double().mean()), "norm_ratio": float(update.norm() / wanted.norm()),
            "relative_error": float((update - wanted).norm() / wanted.norm()),
            "triton": optimizer.triton_applies()}
'''


def fidelity(mode: str, n: int, lr: float = LR, steps: int = STEPS) -> dict:
    scope: dict = {}
    exec(FIDELITY, scope)  # the same function the interpreted run uses
    return scope["fidelity"](mode, n, lr, steps)


def check_fidelity(results: dict) -> None:
    default, nearest = results[DEFAULT], results["bf16"]
    assert default["norm_ratio"] >= MIN_NORM_RATIO and default["relative_error"] <= MAX_RELATIVE_ERROR, results
    assert results["bf16_kahan"]["relative_error"] <= MAX_RELATIVE_ERROR, results
    assert results["bf16_kahan8"]["relative_error"] <= MAX_RELATIVE_ERROR, results
    # rounding to nearest loses most of the update: the experiment can fail
    assert nearest["norm_ratio"] < MIN_NORM_RATIO or nearest["relative_error"] > MAX_RELATIVE_ERROR, results
    assert nearest["moved"] < 0.5, results
    # stochastic rounding moves almost every weight, by the right amount on average (noisy per weight)
    assert results["bf16_sr"]["moved"] > 0.95 and abs(results["bf16_sr"]["norm_ratio"] - 1) < 0.1, results


def test_update_fidelity_plain_torch():
    """1M weights for the default; the other options on fewer (plain torch is slow on a CPU)."""
    results = {mode: fidelity(mode, 1_000_000 if mode == DEFAULT else 100_000) for mode in optim.MASTER_WEIGHTS}
    print(f"\nupdate fidelity at lr {LR}, plain torch: {results}")
    assert not any(r["triton"] for r in results.values())
    check_fidelity(results)


def test_update_fidelity_triton_interpreted():
    """One kernel program's worth of weights, and only the options `check_fidelity` reads: the interpreter
    runs each program in Python. (The kernel and plain torch agree for every option: the test below.)"""
    modes = sorted({DEFAULT, "bf16", "bf16_kahan", "bf16_kahan8", "bf16_sr"})
    script = FIDELITY + f'''
print(json.dumps({{mode: fidelity(mode, optim.BLOCK, {LR}, {STEPS}) for mode in {modes!r}}}))
'''
    results = run_interpreted(script)
    print(f"\nupdate fidelity at lr {LR}, Triton kernel (interpreted): {results}")
    assert all(r["triton"] for r in results.values())
    check_fidelity(results)


AGREE = '''
import json, torch
from pipeline.train import optim

def after_steps(mode, triton, steps=3):
    gen = torch.Generator().manual_seed(1)
    p = torch.nn.Parameter((torch.randn(5000, generator=gen) * 0.02).to(torch.bfloat16))
    optimizer = optim.AdamW([p], lr=3e-5, betas=(0.9, 0.95), weight_decay=0.1, master_weights=mode,
                            triton_min_numel=1 if triton else 1 << 40)
    if not triton:
        optimizer.triton_applies = lambda: False  # the plain-torch path, in the same process
    for step in range(steps):
        p.grad = (torch.randn(5000, generator=gen) * 1e-3).to(torch.bfloat16)
        if step == 1:
            optimizer.found_inf = torch.ones(())  # a skipped step changes nothing
        optimizer.step()
        optimizer.__dict__.pop("found_inf", None)
    state = optimizer.state[p]
    return [p.detach().float()] + [state[k].float() for k in sorted(state) if k != "step"] + [state["step"]]

out = {}
for mode in optim.MASTER_WEIGHTS:
    kernel, torch_path = after_steps(mode, True), after_steps(mode, False)
    out[mode] = {"step": float(kernel[-1]), "torch_step": float(torch_path[-1]),
                 "differ": [float((a != b).double().mean()) for a, b in zip(kernel[:-1], torch_path[:-1])],
                 "largest": [float((a - b).abs().max()) for a, b in zip(kernel[:-1], torch_path[:-1])]}
print(json.dumps(out))
'''


def test_triton_kernel_and_plain_torch_agree_roundings_included():
    """Same state after the same steps, stochastic roundings included: plain torch hashes the bits the kernel
    hashes. (The fp32 arithmetic may round differently in a rare element of the state.)"""
    results = run_interpreted(AGREE)
    print(f"\nTriton kernel vs plain torch: {results}")
    for mode, r in results.items():
        assert r["step"] == r["torch_step"] == 2, (mode, r)
        assert max(r["differ"]) <= 1e-2 and max(r["largest"]) <= 2**-13, (mode, r)
        if mode != "bf16":  # (`bf16` off Triton is torch's own kernel, whose fp64 scalars round otherwise)
            assert r["differ"][0] == 0, (mode, r)  # the weights the model computes with: the same bits


def test_stochastic_rounding_is_unbiased():
    """The mean of many roundings of a value between two bf16 neighbours is the value, within 5 standard
    errors, over the elements of one step and over the steps of one element (what a weight sees while it
    trains); and each rounding is one of the two neighbours."""
    low = torch.tensor(1.0 + 2**-7 * 37)  # a bf16 value
    high = low + 2**-7  # and the next one up
    n, steps = 200_000, 2_000
    over_elements = optim.rounding_bits(torch.tensor(7.0), 3, n)  # the bits `bf16_sr` draws at step 7, parameter 3
    # element 12 of parameter 3 at steps 1..steps
    over_steps = torch.cat([optim.rounding_bits(torch.tensor(float(step)), 3, 13)[12:] for step in range(1, steps + 1)])
    for fraction in (0.01, 0.3, 0.5, 0.93):
        value = low + fraction * 2**-7
        for bits in (over_elements, over_steps):
            x = value.expand(len(bits)).contiguous()
            rounded = optim.round_stochastic(x, bits).double()
            assert set(rounded.unique().tolist()) <= {float(low), float(high)}, fraction
            bound = 5 * 2**-7 * math.sqrt(fraction * (1 - fraction) / len(bits))
            assert abs(rounded.mean() - float(value)) <= bound, (fraction, len(bits), float(rounded.mean()), bound)
            negative = optim.round_stochastic(-x, bits).double()  # rounds in magnitude alike: the same mean
            assert abs(negative.mean() + float(value)) <= bound, fraction


def test_fp32_parameters_are_their_own_master():
    """With fp32 parameters every option is torch's fused AdamW: no extra state, the same weights."""
    gen = torch.Generator().manual_seed(2)
    ours_p = torch.nn.Parameter(torch.randn(64, 48, generator=gen))
    ref_p = torch.nn.Parameter(ours_p.detach().clone())
    ours = optim.AdamW([ours_p], lr=1e-2, betas=(0.9, 0.95), master_weights="fp32")
    ref = torch.optim.AdamW([ref_p], lr=1e-2, betas=(0.9, 0.95), fused=True)
    for _ in range(3):
        g = torch.randn(64, 48, generator=gen)
        ours_p.grad, ref_p.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    assert torch.equal(ours_p, ref_p)
    assert set(ours.state[ours_p]) == {"step", "exp_avg", "exp_avg_sq"}


def test_an_unknown_option_is_refused_naming_the_key():
    from pipeline.errors import PipelineError

    with pytest.raises(PipelineError, match="train.master_weights"):
        Config.from_dict({"train": {"master_weights": "fp16"}})
    with pytest.raises(ValueError, match="master_weights='fp16'"):
        optim.AdamW([torch.nn.Parameter(torch.zeros(2))], master_weights="fp16")


@pytest.mark.parametrize("mode", optim.MASTER_WEIGHTS)
def test_a_resume_from_a_checkpoint_continues_bit_for_bit(mode, tmp_path):
    """A bf16 model trained 4 steps straight, and trained 2, checkpointed, rebuilt, loaded and trained 2
    more: the same weights and optimizer state, the master copy or compensation saved in its own dtype."""
    from pipeline.train.optim import make_optimizer, make_scheduler

    base = demo.make_tiny_checkpoint(tmp_path / "base")
    cfg = Config.from_dict({"model": {"dtype": "bf16"},
                            "train": {"warmup_steps": 1, "max_steps": 4, "lr": 1e-3, "master_weights": mode}})
    batches = [torch.randint(0, 400, (2, 32), generator=torch.Generator().manual_seed(i)) for i in range(4)]

    def build():
        model = te_model.from_hf_checkpoint(base, backend="torch", dtype=torch.bfloat16)
        optimizer = make_optimizer(model, cfg.train)
        return model, optimizer, make_scheduler(optimizer, cfg.train)

    def train(model, optimizer, scheduler, ids_list):
        for ids in ids_list:
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

    straight = build()
    train(*straight, batches)
    first = build()
    train(*first, batches[:2])
    ranks = ckpt.gather_rank_files(ckpt.rank_files({"epoch": 0, "offset": 2}))
    ckpt.write_checkpoint(tmp_path / "ck", module=first[0], optimizer=first[1], scheduler=first[2],
                          trainer_state={"step": 2, "tokens_seen": 128, "metrics": []}, ranks=ranks)
    resumed = build()
    ckpt.load_checkpoint(tmp_path / "ck", module=resumed[0], optimizer=resumed[1], scheduler=resumed[2], rank=0,
                         world_size=1)
    train(*resumed, batches[2:])

    extra = optim.EXTRA_STATE.get(mode)
    saved = load_file(tmp_path / "ck" / ckpt.OPTIMIZER_FILE)
    weights = load_file(tmp_path / "ck" / ckpt.MODEL_FILE)
    name = "model.layers.0.self_attention.layernorm_qkv.query_weight"
    if extra == "master":
        assert saved[f"{name}.master"].dtype == torch.float32
        assert torch.equal(saved[f"{name}.master"].bfloat16(), weights[name])  # the model is the master rounded
    elif extra == "compensation":
        assert saved[f"{name}.compensation"].dtype == torch.bfloat16
    elif extra == "compensation_codes":
        assert saved[f"{name}.compensation_codes"].dtype == torch.int8
        assert saved[f"{name}.compensation_codes"].any()
    else:
        assert not any(key.endswith((".master", ".compensation", ".compensation_codes")) for key in saved)
    for (a_name, a), (_, b) in zip(straight[0].named_parameters(), resumed[0].named_parameters()):
        assert torch.equal(a, b), a_name
    for a, b in zip(straight[1].state.values(), resumed[1].state.values()):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    assert any(not torch.equal(p, q) for p, q in zip(straight[0].parameters(), first[0].parameters()))


def test_one_byte_compensation_codes_are_unbiased_steps_of_the_weights_bf16_step():
    """`bf16_kahan8`: what rounding lost is coded in 1/256 of the stored weight's bf16 step, each code one of
    the two neighbours of the exact quotient, their mean the quotient; codes stay in int8, a NaN codes 0,
    and a zero weight gets a step that is a normal fp32 number."""
    n = 200_000
    bits = optim.rounding_bits(torch.tensor(3.0), 5, n)
    for stored, fraction in ((0.02, 0.3), (-1.5, 0.71), (3e-5, 0.05)):
        weight = torch.tensor(stored).bfloat16().float()
        step = 2.0 ** (math.floor(math.log2(abs(float(weight)))) - 7)  # the bf16 step at |weight|
        quotient = -37.0 + fraction  # lost = quotient / 256 of a step
        lost = torch.full((n,), quotient * step / 256)
        codes = optim.encode_compensation(lost, weight.expand(n), bits)
        assert codes.dtype == torch.int8 and set(codes.unique().tolist()) == {-37, -36}, stored
        bound = 5 * math.sqrt(fraction * (1 - fraction) / n)
        assert abs(codes.double().mean() - quotient) <= bound, (stored, float(codes.double().mean()))
        decoded = optim.decode_compensation(codes, weight.expand(n))
        assert set(decoded.unique().tolist()) == {-37 * step / 256, -36 * step / 256}, stored
    half = torch.full((4,), 0x8000)
    step = 2.0**-13 / 256  # at 0.02
    extremes = torch.tensor([0.5, -0.5, float("nan"), 1e-3]) * 256 * step
    codes = optim.encode_compensation(extremes, torch.full((4,), 0.02), half)
    assert codes.tolist() == [127, -128, 0, 0]
    assert float(optim.decode_compensation(torch.tensor([1], dtype=torch.int8), torch.zeros(1))) == 2.0**-126


def test_one_byte_compensation_takes_a_byte_a_parameter_and_trains_as_the_bf16_one():
    """State `compensation_codes`: int8, one a parameter, beside bf16 moments; 200 fine-tuning steps of the
    update-fidelity experiment land as close to fp32 master weights as `bf16_kahan` (within 1% of the error)."""
    p = torch.nn.Parameter(torch.zeros(1000, dtype=torch.bfloat16))
    opt = optim.AdamW([p], master_weights="bf16_kahan8")
    p.grad = torch.ones_like(p)
    opt.step()
    assert {k: (v.dtype, v.numel()) for k, v in opt.state[p].items() if k != "step"} == {
        "exp_avg": (torch.bfloat16, 1000), "exp_avg_sq": (torch.bfloat16, 1000),
        "compensation_codes": (torch.int8, 1000)}
    for lr in (1e-5, 1e-6):
        one_byte, two_bytes = fidelity("bf16_kahan8", 50_000, lr, 200), fidelity("bf16_kahan", 50_000, lr, 200)
        assert one_byte["relative_error"] <= 1.01 * two_bytes["relative_error"], (lr, one_byte, two_bytes)
        assert abs(one_byte["norm_ratio"] - two_bytes["norm_ratio"]) <= 0.01, (lr, one_byte, two_bytes)


def test_a_kahan_compensation_loads_across_its_two_kinds(tmp_path):
    """A checkpoint of `bf16_kahan` loads into `bf16_kahan8` and back through the checkpoint's files: the
    compensation converted to the nearest code, and the run goes on from it."""
    torch.manual_seed(0)
    module = torch.nn.Linear(256, 64, bias=False).to(torch.bfloat16)

    def optimizer(mode: str) -> optim.AdamW:
        return optim.AdamW(module.parameters(), lr=1e-4, master_weights=mode)

    def save_and_load(saved: optim.AdamW, mode: str) -> optim.AdamW:
        return through_checkpoint_files(module, saved, optimizer(mode), tmp_path)

    two_bytes = optimizer("bf16_kahan")
    for _ in range(3):
        module.weight.grad = torch.randn_like(module.weight) * 1e-3
        two_bytes.step()
    weight = module.weight
    exact = two_bytes.state[weight]["compensation"].float()
    one_byte = save_and_load(two_bytes, "bf16_kahan8")
    assert set(one_byte.state[weight]) == {"step", "exp_avg", "exp_avg_sq", "compensation_codes"}
    decoded = optim.decode_compensation(one_byte.state[weight]["compensation_codes"], weight.detach())
    code_step = optim.decode_compensation(torch.ones_like(weight, dtype=torch.int8), weight.detach())
    # half a code's step, or a whole one where a tie left exactly half a weight step (the codes stop at 127)
    limit = torch.where(exact / code_step > 127, code_step, code_step / 2)
    assert exact.abs().max() > 0 and ((decoded - exact).abs() <= limit).all()
    module.weight.grad = torch.randn_like(module.weight) * 1e-3
    one_byte.step()
    back = save_and_load(one_byte, "bf16_kahan")
    assert set(back.state[weight]) == {"step", "exp_avg", "exp_avg_sq", "compensation"}
    assert back.state[weight]["compensation"].dtype == torch.bfloat16
    codes = one_byte.state[weight]["compensation_codes"]
    torch.testing.assert_close(back.state[weight]["compensation"].float(),
                               optim.decode_compensation(codes, weight.detach()), rtol=2**-8, atol=0)
