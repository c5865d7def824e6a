"""The patched model inside HF's machinery: swap and restore, hidden states, activation checkpointing,
KV-cache refusal, masks, FP8 padding, and training with a plain loop and with `transformers.Trainer`."""

import subprocess
import sys
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments
from transformers.models.llama import modeling_llama

import te_model
from te_model.backend import te_unavailable_reason
from tests.support.llama_variants import hf_model, llama_config


@pytest.fixture(scope="module")
def hf_and_te(tmp_path_factory):
    hf = hf_model(llama_config("llama3"))
    path = tmp_path_factory.mktemp("ckpt")
    hf.save_pretrained(path)
    return hf, te_model.from_hf_checkpoint(path, backend="torch", dtype=torch.float32)


def test_import_does_not_load_transformer_engine():
    code = ("import sys, te_model; first = 'transformer_engine' in sys.modules; te_model.build_model; "
            "print(first, 'transformer_engine' in sys.modules)")
    assert subprocess.check_output([sys.executable, "-c", code], text=True).split() == ["False", "False"]


@pytest.mark.skipif(te_unavailable_reason() is None, reason="TE can run here: auto resolves to te")
def test_backend_resolution_on_cpu():
    assert te_model.resolve_backend("auto") == "torch"
    with pytest.raises(te_model.BackendUnavailableError, match="backend 'te' requested but"):
        te_model.resolve_backend("te")
    with pytest.raises(ValueError, match="backend must be one of"):
        te_model.resolve_backend("cuda")


def test_replace_decoder_restores_after_exception():
    original = modeling_llama.LlamaDecoderLayer, modeling_llama.LlamaModel
    with pytest.raises(RuntimeError, match="boom"):
        with te_model.replace_decoder("torch"):
            assert modeling_llama.LlamaDecoderLayer is te_model.TorchLlamaDecoderLayer
            raise RuntimeError("boom")
    assert (modeling_llama.LlamaDecoderLayer, modeling_llama.LlamaModel) == original


def test_a_layer_with_a_final_norm_class_brings_it_into_the_model_and_its_checkpoint_is_hfs(monkeypatch):
    """The TE layer's `final_norm_class` (`LlamaTERMSNorm`) becomes the model's final norm within
    `replace_decoder`, and HF's `LlamaRMSNorm` is back after it, also when the body raises. Off CUDA the norm runs
    HF's math: the same loss, and the same checkpoint keys and values, as the torch backend's HF norm."""
    from te_model.norm_te import LlamaTERMSNorm

    class WithTENorm(te_model.TorchLlamaDecoderLayer):
        final_norm_class = LlamaTERMSNorm

    monkeypatch.setattr(te_model.model, "decoder_layer_class", lambda backend: WithTENorm)
    config = llama_config("llama3")
    hf_norm = modeling_llama.LlamaRMSNorm
    with pytest.raises(RuntimeError, match="boom"):
        with te_model.replace_decoder("torch"):
            raise RuntimeError("boom")
    assert modeling_llama.LlamaRMSNorm is hf_norm
    torch.manual_seed(0)
    ours = te_model.build_model(config, backend="torch", dtype=torch.float32).train()
    assert modeling_llama.LlamaRMSNorm is hf_norm
    assert type(ours.model.norm) is LlamaTERMSNorm and ours.model.norm.variance_epsilon == config.rms_norm_eps
    monkeypatch.undo()
    plain = te_model.build_model(config, backend="torch", dtype=torch.float32).train()
    assert type(plain.model.norm) is hf_norm
    with torch.no_grad():  # HF's initialisation knows it by name: ones, as HF's own norm
        ours.model.norm.weight.mul_(0)
    ours._init_weights(ours.model.norm)
    assert torch.equal(ours.model.norm.weight, torch.ones_like(ours.model.norm.weight))
    with torch.no_grad():
        ours.model.norm.weight.uniform_(0.5, 1.5)
    plain.load_state_dict(ours.state_dict(), strict=True)
    ids = torch.randint(0, config.vocab_size, (2, 16))
    assert torch.equal(ours(input_ids=ids, labels=ids).loss, plain(input_ids=ids, labels=ids).loss)


def test_parameter_names_are_transformer_engines():
    model = te_model.build_model(llama_config("llama3"), backend="torch", dtype=torch.float32)
    names = {n.split("layers.0.", 1)[1] for n, _ in model.named_parameters() if "layers.0." in n}
    assert names == {
        "self_attention.layernorm_qkv.layer_norm_weight", "self_attention.layernorm_qkv.query_weight",
        "self_attention.layernorm_qkv.key_weight", "self_attention.layernorm_qkv.value_weight",
        "self_attention.proj.weight", "layernorm_mlp.layer_norm_weight", "layernorm_mlp.fc1_weight",
        "layernorm_mlp.fc2_weight",
    }


def test_output_hidden_states_returns_every_layer(hf_and_te):
    hf, te = hf_and_te
    ids = torch.randint(0, 320, (2, 48))
    with torch.no_grad():
        expected = hf(ids, output_hidden_states=True).hidden_states
        actual = te(ids, output_hidden_states=True).hidden_states
    assert len(actual) == hf.config.num_hidden_layers + 1
    for i, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5, msg=f"hidden state {i}")


def test_kv_cache_is_refused_and_plain_generation_is_right(hf_and_te):
    hf, te = hf_and_te
    ids = torch.randint(0, 320, (1, 12))
    with pytest.raises(te_model.KVCacheUnsupportedError, match="does not support a KV cache"):
        te.generate(ids, max_new_tokens=3, do_sample=False, use_cache=True)
    # with the cache off (the patched model's default), generation recomputes and matches HF
    out = te.generate(ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(out, hf.generate(ids, max_new_tokens=5, do_sample=False))


def test_a_cache_handed_in_is_refused_under_either_name_and_plain_calls_do_not_warn(hf_and_te):
    from transformers import DynamicCache

    _, te = hf_and_te
    ids = torch.randint(0, 320, (1, 12))
    for name in ("cache", "past_key_values"):  # transformers 5.24's name and the one before
        for forward in (te, te.model):
            with pytest.raises(te_model.KVCacheUnsupportedError, match="does not support a KV cache"):
                forward(ids, **{name: DynamicCache(config=te.config)})
    # HF deprecates `past_key_values` with a FutureWarning whenever it is passed, None included: ours
    # must not pass it on in any forward, with labels or without, training or not
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        te.train()
        te(ids, labels=ids).loss.backward()
        te.eval()
        with torch.no_grad():
            te(ids, labels=ids)
            te(ids)
    te.zero_grad(set_to_none=True)


def test_padding_with_holes_is_refused(hf_and_te):
    _, te = hf_and_te
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 5] = 0
    with pytest.raises(te_model.MaskError, match="attention_mask row 1"):
        te(torch.randint(0, 320, (2, 16)), attention_mask=mask)


def _saved_activation_bytes(model, ids):
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids, labels=ids).loss
    loss.backward()
    return total, {n: p.grad.clone() for n, p in model.named_parameters()}


# HF's switch for whole-layer recompute: renamed in transformers 5.24, the old name deprecated
WHOLE_LAYERS = next(name for name in ("activation_checkpointing_enable", "gradient_checkpointing_enable")
                    if hasattr(modeling_llama.LlamaForCausalLM, name))


@pytest.mark.parametrize("enable, flag", [(WHOLE_LAYERS, "gradient_checkpointing"),
                                          ("mlp_recompute_enable", "recompute_mlp")])
def test_recompute_keeps_less_and_changes_no_gradient(enable, flag):
    config = llama_config("llama3", num_hidden_layers=4)
    model = te_model.build_model(config, backend="torch", dtype=torch.float32).train()
    ids = torch.randint(0, 320, (4, 128))
    plain_bytes, plain_grads = _saved_activation_bytes(model, ids)
    model.zero_grad()
    getattr(model, enable)()
    assert all(getattr(layer, flag) for layer in model.model.layers)
    kept_bytes, grads = _saved_activation_bytes(model, ids)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    if flag == "gradient_checkpointing":
        assert kept_bytes < 0.5 * plain_bytes, f"saved {kept_bytes} vs {plain_bytes} bytes"
    else:  # no longer kept, per layer and token: at least FC1's output (gate and up) and FC2's input, fp32
        dropped = config.num_hidden_layers * ids.numel() * 3 * config.intermediate_size * 4
        assert plain_bytes - kept_bytes >= dropped, (plain_bytes, kept_bytes, dropped)


def test_is_first_microbatch_reaches_every_layer_and_changes_nothing_on_the_torch_backend():
    config = llama_config("llama3", num_hidden_layers=2)
    model = te_model.build_model(config, backend="torch", dtype=torch.float32).train()
    seen = []
    for layer in model.model.layers:
        layer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("is_first_microbatch")), with_kwargs=True)
    ids = torch.randint(0, 320, (2, 32))
    plain = model(input_ids=ids, labels=ids).loss
    first = model(input_ids=ids, labels=ids, is_first_microbatch=True).loss
    later = model(input_ids=ids, labels=ids, is_first_microbatch=False).loss
    assert seen == [None, None, True, True, False, False]
    assert first.item() == plain.item() == later.item()


def test_fp8_attention_needs_a_per_tensor_recipe():
    with pytest.raises(te_model.FP8UnsupportedError, match="'block' cannot run attention in FP8"):
        te_model.fp8.make_recipe("block", fp8_attention=True)


def test_fast_accumulation_needs_a_per_tensor_recipe():
    with pytest.raises(te_model.FP8UnsupportedError, match="'block' cannot run its gradients' GEMMs with fast"):
        te_model.fp8.make_recipe("block", fast_accumulation=True)


def test_pad_to_multiple_keeps_outputs(hf_and_te):
    _, te = hf_and_te
    ids = torch.randint(0, 320, (2, 37))
    positions = torch.cat([torch.arange(20), torch.arange(17)])[None].expand(2, -1)
    batch = {"input_ids": ids, "labels": ids, "position_ids": positions}
    padded = te_model.pad_to_multiple(batch, pad_token_id=0)
    assert padded["input_ids"].shape[1] == 48
    te_model.check_fp8_tokens(padded["input_ids"].numel())
    with pytest.raises(te_model.FP8UnsupportedError, match="74 tokens"):
        te_model.check_fp8_tokens(ids.numel())
    with torch.no_grad():
        a = te(**batch)
        b = te(**padded)
    torch.testing.assert_close(b.logits[:, :37], a.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.loss, a.loss, rtol=1e-5, atol=1e-6)


def _text_batches(vocab, steps, seed=0):
    """A learnable stream: each row counts upward modulo the vocabulary from a random start."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        start = torch.randint(0, vocab, (8, 1), generator=g)
        yield (start + torch.arange(64)) % vocab


def test_plain_loop_trains():
    model = te_model.build_model(llama_config("llama3"), backend="torch", dtype=torch.float32).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for ids in _text_batches(320, 40):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses


class _Rows(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


def test_trainer_trains_and_saves_hf_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = te_model.build_model(llama_config("llama3"), backend="torch", dtype=torch.float32)
    rows = [r for batch in _text_batches(320, 30) for r in batch]
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=8, learning_rate=3e-3, max_steps=30,
        save_steps=30, logging_steps=5, report_to=[], use_cpu=True,
        lr_scheduler_type="constant", disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=_Rows(rows),
                      callbacks=[te_model.SaveHFCheckpointCallback()])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < 0.6 * losses[0], losses

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint-30" / "hf").eval()
    ids = rows[0][None]
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, model.eval()(ids).logits, rtol=1e-5, atol=1e-5)


def test_training_loss_skips_logits_and_matches_hf(hf_and_te):
    """A training forward pass returns HF's loss and gradients without logits; `fused_loss=False` restores them."""
    hf, te = hf_and_te
    ids = torch.randint(0, 320, (2, 29))
    labels = ids.clone()
    labels[0, :7] = -100  # a masked prompt
    hf.train(), te.train()
    ref = hf(input_ids=ids, labels=labels)
    ref.loss.backward()
    out = te(input_ids=ids, labels=labels)
    assert out.logits is None
    out.loss.backward()
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    grads = {"lm_head.weight": "lm_head.weight", "model.embed_tokens.weight": "model.embed_tokens.weight",
             "model.norm.weight": "model.norm.weight"}
    for te_name, hf_name in grads.items():
        te_grad, hf_grad = te.get_parameter(te_name).grad, hf.get_parameter(hf_name).grad
        torch.testing.assert_close(te_grad, hf_grad, rtol=1e-4, atol=1e-6, msg=te_name)
    te.fused_loss = False
    try:
        assert te(input_ids=ids, labels=labels).logits.shape == (2, 29, te.config.vocab_size)
    finally:
        te.fused_loss = True
        hf.zero_grad(set_to_none=True), te.zero_grad(set_to_none=True)


def test_attention_plan_keeps_the_shapes_te_compares_few():
    """Packed rows: the longest segment rounded up to a power of two (at least 64, at most the row) and
    the segment count padded to a power of two, so TE sees few distinct values (one backend selection
    each) instead of new ones for nearly every batch; segment boundaries stay exact."""
    from te_model.segments import plan_attention

    position_ids = torch.cat([torch.arange(70), torch.arange(30), torch.arange(28)])[None]  # 128 tokens
    plan = plan_attention(1, 128, position_ids=position_ids)
    assert plan.cu_seqlens.tolist() == [0, 70, 100, 128, 128]  # one empty segment: 4 segments in all
    assert plan.max_seqlen == 128  # 70 rounded up to a power of two
    plain = plan_attention(2, 64)
    assert plain.max_seqlen == 64 and plain.one_segment_per_row
    seen = {plan_attention(1, 4096, position_ids=torch.cat([torch.arange(n), torch.arange(4096 - n)])[None]).max_seqlen
            for n in [*range(1, 4096, 7), 2048]}
    assert seen == {2048, 4096}  # 294 different longest documents, from 2048 to 4095 tokens: two values
    short = {plan_attention(1, 4096, position_ids=torch.arange(n).repeat(4096 // n + 1)[None, :4096]).max_seqlen
             for n in range(1, 2049, 5)}
    assert short == {64, 128, 256, 512, 1024, 2048}  # documents of 1 to 2046 tokens: six values
    # a row that is not a power of two caps the bucket at its own length (rounded up to 64)
    assert plan_attention(1, 960, position_ids=torch.cat([torch.arange(900), torch.arange(60)])[None]).max_seqlen == 960
    counts = set()
    for docs in range(5, 400, 3):  # 132 batches of 5 to 398 documents: 7 segment counts
        lengths = [8] * (docs - 1) + [4096 - 8 * (docs - 1)]
        cu = plan_attention(1, 4096, position_ids=torch.cat([torch.arange(n) for n in lengths])[None]).cu_seqlens
        assert cu[: docs + 1].diff().tolist() == lengths and (cu[docs:] == 4096).all()
        counts.add(len(cu) - 1)
    assert counts == {8, 16, 32, 64, 128, 256, 512}


def test_a_plan_made_beforehand_gives_the_same_loss_and_a_wrong_one_is_refused(hf_and_te):
    """The training loop plans attention and finds the scored tokens from the host's rows and hands them
    in: same loss and gradients as finding them inside the forward; ones for other shapes, or a plan with
    a mask, are refused."""
    from te_model.segments import plan_attention

    _, te = hf_and_te
    te.train()
    ids = torch.randint(0, 320, (2, 32))
    labels = ids.clone()
    labels[0, :9] = -100  # a masked prompt
    labels[1, 20] = -100  # the first token of the second document
    positions = torch.cat([torch.arange(20), torch.arange(12)]).repeat(2, 1)  # two documents a row
    cpu = torch.device("cpu")
    batch = {"input_ids": ids, "labels": labels, "position_ids": positions}
    losses, grads = [], []
    for inputs in (batch, {**batch, "attention_plan": plan_attention(2, 32, positions).to(cpu),
                           "scored_tokens": te_model.scored_tokens(labels).to(cpu)},
                   te_model.prepare_batch(batch, cpu)):
        te.zero_grad(set_to_none=True)
        loss = te(**inputs).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append({name: p.grad.clone() for name, p in te.named_parameters()})
    te.zero_grad(set_to_none=True)
    for other in (1, 2):
        assert torch.equal(losses[0], losses[other])
        assert all(torch.equal(grads[0][name], grads[other][name]) for name in grads[0])
    # 31 predictions a row; row 0's positions 0-7 predict masked labels 1-8, row 1's position 19 label 20
    assert te_model.scored_tokens(labels).index.numel() == 2 * 31 - 8 - 1
    with pytest.raises(ValueError, match=r"scored tokens are for labels of shape \(1, 32\)"):
        te(input_ids=ids, labels=labels, scored_tokens=te_model.scored_tokens(labels[:1]))
    with pytest.raises(te_model.MaskError, match=r"shape \(1, 32\), the inputs have shape \(2, 32\)"):
        te(input_ids=ids, labels=ids, position_ids=positions, attention_plan=plan_attention(1, 32))
    with pytest.raises(te_model.MaskError, match="both given"):
        te(input_ids=ids, labels=ids, attention_mask=torch.ones(2, 32), attention_plan=plan_attention(2, 32))


def test_prepare_batch_puts_the_padding_mask_into_the_plan(hf_and_te):
    """A right-padded batch through `prepare_batch`: the mask becomes the plan's segments, not an input,
    and the real tokens' logits are those of the model called with the mask."""
    _, te = hf_and_te
    te.eval()
    ids = torch.randint(0, 320, (2, 24))
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[1, 17:] = 0
    inputs = te_model.prepare_batch({"input_ids": ids, "attention_mask": mask}, torch.device("cpu"))
    assert sorted(inputs) == ["attention_plan", "input_ids"]
    assert inputs["attention_plan"].cu_seqlens.tolist() == [0, 24, 41, 48, 48]  # row 1: 17 real, 7 padding
    with torch.no_grad():
        planned, masked = te(**inputs).logits, te(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert torch.equal(planned[real], masked[real])
