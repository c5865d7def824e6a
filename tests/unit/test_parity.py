"""The torch backend is HF's Llama: logits and parameter gradients, fp32, every family and input layout.

The TE-style model is loaded through the real converter (`save_pretrained` → `from_hf_checkpoint`).
Comparisons are made only where HF's output is defined (non-pad positions). Each variant has a negative
control: HF with the variant's feature switched off must differ far beyond the tolerance, which shows
the inputs are long enough for theta, rope scaling and tying to matter.
"""

import pytest
import torch

import te_model
from te_model.weights import hf_to_te_key
from tests.support.llama_variants import VARIANTS, copy_weights, hf_model, llama_config

RTOL = ATOL = 1e-5
SEQ = 96
BATCH = 3


def assert_close(actual, expected, what):
    err = (actual - expected).abs()
    torch.testing.assert_close(
        actual, expected, rtol=RTOL, atol=ATOL,
        msg=lambda m: f"{what}: max abs err {err.max():.3e}, mean {err.mean():.3e}\n{m}",
    )


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, tmp_path_factory):
    """(variant name, HF model, TE-style torch-backend model with the same weights)."""
    name = request.param
    hf = hf_model(llama_config(name))
    path = tmp_path_factory.mktemp(name.replace(".", "_"))
    hf.save_pretrained(path, max_shard_size="200KB")
    te = te_model.from_hf_checkpoint(path, backend="torch", dtype=torch.float32).eval()
    return name, hf, te


def make_inputs(layout: str, vocab: int, seed: int = 1):
    """input_ids plus the kwargs of one layout, and the (B, S) mask of positions to compare."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (BATCH, SEQ), generator=g)
    valid = torch.ones(BATCH, SEQ, dtype=torch.bool)
    if layout == "plain":
        return ids, {}, valid
    if layout in ("right", "left"):
        lengths = torch.tensor([SEQ, SEQ - 17, SEQ - 40])
        pos = torch.arange(SEQ)[None]
        valid = pos < lengths[:, None] if layout == "right" else pos >= (SEQ - lengths)[:, None]
        return ids, {"attention_mask": valid.long()}, valid
    if layout == "packed":
        docs = [[40, 30, 26], [96], [10, 50, 36]]
        position_ids = torch.cat([torch.cat([torch.arange(n) for n in row])[None] for row in docs])
        return ids, {"position_ids": position_ids}, valid
    raise ValueError(layout)


def packed_reference(hf, ids, position_ids, weights):
    """HF run on each packed document alone: what packing must reproduce."""
    rows = []
    for b in range(ids.shape[0]):
        starts = (position_ids[b] == 0).nonzero().flatten().tolist() + [ids.shape[1]]
        pieces = [hf(ids[b : b + 1, s:e]).logits for s, e in zip(starts, starts[1:])]
        rows.append(torch.cat(pieces, dim=1))
    logits = torch.cat(rows)
    ((logits * weights).sum() / logits.shape[0] / logits.shape[1]).backward()
    return logits


def run(model, ids, kwargs, weights, valid):
    model.zero_grad()
    logits = model(ids, **kwargs).logits
    # a mean over the compared tokens, as a training loss is: gradients of O(1) size
    ((logits * weights * valid[..., None]).sum() / valid.sum()).backward()
    return logits


@pytest.mark.parametrize("layout", ["plain", "right", "left", "packed"])
def test_logits_and_grads_match_hf(pair, layout):
    name, hf, te = pair
    ids, kwargs, valid = make_inputs(layout, hf.config.vocab_size)
    weights = torch.randn(BATCH, SEQ, hf.config.vocab_size, generator=torch.Generator().manual_seed(2))
    hf.zero_grad()
    if layout == "packed":
        expected = packed_reference(hf, ids, kwargs["position_ids"], weights)
    else:
        expected = run(hf, ids, kwargs, weights, valid)
    actual = run(te, ids, kwargs, weights, valid)
    assert_close(actual[valid], expected[valid], f"{name}/{layout} logits")

    te_params = dict(te.named_parameters())
    for hf_name, param in hf.named_parameters():
        te_name, part = hf_to_te_key(hf_name)
        grad = te_model.weights.fc1_part(te_params[te_name].grad, part)
        assert_close(grad, param.grad, f"{name}/{layout} grad {hf_name}")


def test_packing_matters(pair):
    """Negative control for packed rows: HF over the whole row (no document mask) differs."""
    name, hf, _ = pair
    ids, kwargs, valid = make_inputs("packed", hf.config.vocab_size)
    with torch.no_grad():
        per_doc = torch.cat(
            [hf(ids[:, s:e]).logits for s, e in [(0, 40), (40, 70), (70, 96)]], dim=1
        )[0]
        whole = hf(ids).logits[0]
    assert (per_doc - whole).abs().max() > 1000 * ATOL


@pytest.mark.parametrize("name", list(VARIANTS))
def test_feature_off_moves_hf_logits(name):
    """Negative control per family: other theta / no llama3 scaling / untied head changes HF's output."""
    on = hf_model(llama_config(name))
    off = hf_model(llama_config(name, feature_on=False), seed=1)
    copy_weights(on, off)
    ids, _, _ = make_inputs("plain", on.config.vocab_size)
    with torch.no_grad():
        diff = (on(ids).logits - off(ids).logits).abs().max()
    assert diff > 1000 * ATOL, f"{name}: switching the feature off moved logits by only {diff:.2e}"
