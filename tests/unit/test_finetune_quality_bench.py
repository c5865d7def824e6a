"""bench/finetune_quality.py end to end in its smoke mode on the CPU: a tiny base pretrained on the
standard library, fine-tuned on C headers by the HF reference and by ours with and without master weights."""

from __future__ import annotations

import math

import pytest

from bench import finetune_quality


def test_finetune_quality_smoke_runs_end_to_end(capsys):
    rows = finetune_quality.main(["--smoke", "--device", "cpu", "--pretrain-steps", "4", "--finetune-steps", "4",
                                  "--lrs", "2e-5", "--variants", "hf_fp32_master,ours_bf16_fp32,ours_bf16_bf16"])
    out = capsys.readouterr().out
    assert [r["variant"] for r in rows] == ["hf_fp32_master", "ours_bf16_fp32", "ours_bf16_bf16"]
    for r in rows:
        assert math.isfinite(r["held_out_loss"]) and r["movement"] > 0 and r["step_ms"] > 0, r
    assert "corpus A:" in out and "corpus B:" in out and "pretrain step" in out
    assert "vs ref %" in out and "ours_bf16_fp32" in out.split("vs ref %")[1]
    # fp32 master weights move the weights as the fp32 reference does; rounding to nearest loses part
    reference, master, nearest = (r["movement"] for r in rows)
    assert abs(master - reference) < 0.2 * reference and nearest < master, rows


def test_finetune_quality_with_a_learnt_vocabulary_trains_on_its_ids(capsys):
    rows = finetune_quality.main(["--smoke", "--device", "cpu", "--pretrain-steps", "2", "--finetune-steps", "3",
                                  "--lrs", "2e-5", "--variants", "hf_fp32_master,ours_bf16_bf16_kahan",
                                  "--vocab", "1024"])
    out = capsys.readouterr().out
    assert "byte-level BPE learnt on A: 1024 tokens of a 1024-token head" in out
    assert all(math.isfinite(r["held_out_loss"]) for r in rows), rows
    # a model over 1024 tokens starts near ln(1024) nats a token, not a byte model's ln(256)
    base = float(out.split("before fine-tuning:")[1].split()[0])
    assert math.log(512) < base < 1.5 * math.log(1024), base


def test_finetune_quality_refuses_a_vocabulary_the_fp8_head_cannot_run(capsys):
    with pytest.raises(SystemExit):
        finetune_quality.parse_args(["--vocab", "1000"])
    assert "--vocab 1000: must be 256 (bytes) or a larger multiple of 16" in capsys.readouterr().err
