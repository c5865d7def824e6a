"""Config loading: presets, dotted overrides, and one-line errors that name the offending key."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from pipeline.config import PRESET_DIR, Config, DataConfig, TrainConfig, describe_keys, load_config, valid_keys
from pipeline.errors import PipelineError

PRESETS = sorted(PRESET_DIR.glob("*.yaml"))


def write_yaml(tmp_path: Path, content: dict, name: str = "preset") -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(content))
    return str(path)


# What every config but the demo must name.
NAMED = {"model": {"base_uri": "s3://bucket/base"}, "data": {"train_files": ["s3://bucket/train.jsonl"]},
         "train": {"max_steps": 1000}, "export": {"registered_model_name": "my-model"}}


def test_presets_exist_and_load():
    names = {p.stem for p in PRESETS}
    assert {"tiny-cpu", "llama3.2-3b-fp8", "llama3.1-8b-fp8-fsdp", "gpu-small-fp8"} <= names
    for path in PRESETS:
        load_config(str(path), [])


def test_no_config_is_the_tiny_demo_preset():
    assert load_config(str(PRESET_DIR / "tiny-cpu.yaml")) == load_config(None, [])
    assert load_config("tiny-cpu") == load_config(None)  # a bare name resolves to configs/<name>.yaml


def test_the_demo_finds_its_shipped_text_from_any_folder(tmp_path, monkeypatch):
    shipped = PRESET_DIR.parent / "data" / "tiny_text.jsonl"
    monkeypatch.chdir(PRESET_DIR.parent)
    assert load_config(None).data.train_files == ["data/tiny_text.jsonl"]  # as the preset names it
    monkeypatch.chdir(tmp_path)
    assert load_config(None).data.train_files == [str(shipped)]  # not here: the project's own
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "tiny_text.jsonl").write_text('{"text": "mine"}\n')
    assert load_config(None).data.train_files == ["data/tiny_text.jsonl"]  # a file of that name here is used
    overridden = load_config(None, ["data.train_files=[other.jsonl]"]).data.train_files
    assert overridden == ["other.jsonl"]  # overrides and other configs are taken as written
    (tmp_path / "data" / "tiny_text.jsonl").unlink()
    named = write_yaml(tmp_path, {**NAMED, "data": {"train_files": ["data/tiny_text.jsonl"]}})
    assert load_config(named).data.train_files == ["data/tiny_text.jsonl"]  # a user's config: as written


def test_every_shipped_preset_finds_its_shipped_text_from_any_folder(tmp_path, monkeypatch):
    shipped = str(PRESET_DIR.parent / "data" / "tiny_text.jsonl")
    monkeypatch.chdir(tmp_path)
    assert load_config("gpu-small-fp8").data.train_files == [shipped]
    assert load_config(str(PRESET_DIR / "gpu-small-fp8.yaml")).data.train_files == [shipped]
    copy = tmp_path / "gpu-small-fp8.yaml"  # the same file outside configs/ is a user's config
    copy.write_text((PRESET_DIR / "gpu-small-fp8.yaml").read_text())
    assert load_config(str(copy)).data.train_files == ["data/tiny_text.jsonl"]


def test_demo_settings_never_leak_into_other_configs(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    demo = load_config(None)
    cfg = load_config(write_yaml(tmp_path, NAMED, name="my-sft"))
    assert cfg.train.lr == pytest.approx(2e-5) and demo.train.lr == pytest.approx(3e-3)
    assert (cfg.run.name, cfg.run.experiment, cfg.tracking.experiment) == ("my-sft", "my-sft", "my-sft")
    assert cfg.model.base_uri == "s3://bucket/base" and cfg.export.registered_model_name == "my-model"
    assert "tiny" not in cfg.to_yaml() and "demo" not in cfg.to_yaml()
    for field in ("model.base_uri", "data.train_files", "train.max_steps", "export.registered_model_name"):
        section, name = field.split(".")
        partial = {s: {k: v for k, v in values.items() if k != name} for s, values in NAMED.items()}
        path = write_yaml(tmp_path, partial, name="partial")
        with pytest.raises(PipelineError, match=rf"^{re.escape(field)} is not set in {re.escape(path)}: "):
            load_config(path)
        value = {"data.train_files": "[x]", "train.max_steps": "10"}.get(field, "x")
        assert load_config(path, [f"{field}={value}"])  # or an override
    unregistered = write_yaml(tmp_path, {**NAMED, "export": {"registered_model_name": None}}, name="unregistered")
    assert load_config(unregistered).export.registered_model_name is None  # null: chosen, not forgotten


# Keys the demo sizes for two CPU workers and a 2-layer model; a real config must get other defaults.
DEMO_SIZED = ("model.dtype", "data.seq_len", "train.workers", "train.use_gpu", "train.micro_batch_size",
              "train.warmup_steps", "train.max_steps", "train.checkpoint_every", "train.log_every",
              "eval.batch_size", "eval.max_batches", "eval.max_new_tokens", "eval.prompts",
              "export.max_shard_size")


def test_defaults_are_for_real_fine_tunes_and_the_demo_states_its_own(tmp_path):
    demo, real = load_config(None).flat_params(), load_config(write_yaml(tmp_path, NAMED)).flat_params()
    assert [key for key in DEMO_SIZED if demo[key] == real[key]] == []
    demo_file = yaml.safe_load((PRESET_DIR / "tiny-cpu.yaml").read_text())
    assert [key for key in DEMO_SIZED if key.split(".")[1] not in demo_file[key.split(".")[0]]] == []
    assert (real["model.dtype"], real["data.seq_len"], real["train.use_gpu"], real["train.workers"]) == (
        "bf16", 2048, True, 1)


def test_warmup_unset_is_three_percent_of_max_steps_rounded_up(tmp_path):
    path = write_yaml(tmp_path, NAMED)
    warmups = [load_config(path, [f"train.max_steps={n}"]).train.warmup_steps for n in (1, 100, 101, 1000)]
    assert warmups == [1, 3, 4, 30]
    assert load_config(path, ["train.max_steps=10", "train.warmup_steps=0"]).train.warmup_steps == 0
    cfg = load_config(path, ["train.max_steps=50"])
    assert Config.from_dict(cfg.to_dict()) == cfg  # resolved once: workers and checkpoints get the number


def test_max_steps_has_no_default(tmp_path):
    with pytest.raises(PipelineError, match=r"^train.max_steps is not set: give the optimizer steps"):
        load_config(write_yaml(tmp_path, NAMED), ["train.max_steps=null"])  # set, but to nothing
    assert Config().train.max_steps is None and Config().train.warmup_steps is None
    from pipeline.train.launch import train
    with pytest.raises(PipelineError, match=r"^train.max_steps is not set"):
        train(Config(), prepared=None)  # a config built in code fails before any worker starts


def test_mlflow_environment_fills_what_the_config_leaves_unset(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "from-env")
    path = write_yaml(tmp_path, NAMED)
    cfg = load_config(path)
    assert (cfg.tracking.uri, cfg.tracking.experiment) == ("http://tracking.example:5000", "from-env")
    assert load_config(None).tracking.uri == "http://tracking.example:5000"  # the demo too
    chosen = load_config(path, ["tracking.uri=http://other:5000", "tracking.experiment=mine"])
    assert (chosen.tracking.uri, chosen.tracking.experiment) == ("http://other:5000", "mine")
    assert Config.from_dict(cfg.to_dict()) == cfg  # resolved once: workers get the same values
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME")
    assert load_config(path).tracking.uri == "sqlite:///.cache/mlflow.db"


def test_every_key_is_listed_with_its_documentation():
    listing = describe_keys()
    for key in valid_keys():
        assert f"\n{key}  (" in f"\n{listing}", key
    assert "(undocumented)" not in listing
    assert "train.lr  (float; default 2.0e-05)\n    Peak AdamW learning rate." in listing


def test_default_is_a_small_cpu_job():
    cfg = load_config(None)
    shape = (cfg.train.use_gpu, cfg.train.fp8, cfg.model.dtype, cfg.data.seq_len)
    assert shape == (False, "none", "fp32", 128)
    assert cfg.train.workers == 2 and cfg.train.max_steps <= 50
    assert cfg.tracking.experiment == cfg.run.experiment
    assert not any("://" in f for f in cfg.data.train_files)


def test_gpu_presets_are_fp8_on_gpu():
    big = load_config("llama3.2-3b-fp8")
    assert (big.train.fp8, big.train.use_gpu, big.model.dtype, big.train.workers, big.data.seq_len) == (
        "delayed", True, "bf16", 8, 4096)
    assert big.model.base_uri.startswith("s3://")
    assert big.train.parallelism == "ddp" and load_config("llama3.1-8b-fp8-fsdp").train.parallelism == "fsdp"
    one, h100 = load_config("llama3.1-8b-fp8-1gpu"), load_config("llama3.1-8b-fp8-h100")
    lean = (h100.train.moments_fp8, h100.train.master_weights, h100.train.recast_fp8_weights)
    assert lean == (True, "bf16_kahan8", True)  # what holds it under 80 GB
    assert dataclasses.replace(h100.train, moments_fp8=False, master_weights="bf16_kahan",
                               recast_fp8_weights=False) == one.train
    small = load_config("gpu-small-fp8")
    assert (small.train.fp8, small.train.use_gpu, small.train.workers) == ("delayed", True, 1)


def test_overrides_are_parsed_as_yaml_values():
    cfg = load_config(None, [
        "train.lr=2e-5", "train.max_steps=7", "train.warmup_steps=0", "data.add_eos=false",
        "data.train_files=[a.jsonl, s3://b/c.parquet]", "data.validation_files=null", "eval.max_batches=",
        "tracking.uri=http://host:5000/?x=1", "run.name=with spaces",
    ])
    assert cfg.train.lr == pytest.approx(2e-5) and isinstance(cfg.train.lr, float)
    assert cfg.train.max_steps == 7 and cfg.data.add_eos is False
    assert cfg.data.train_files == ["a.jsonl", "s3://b/c.parquet"]
    assert cfg.data.validation_files is None and cfg.eval.max_batches is None
    assert cfg.tracking.uri == "http://host:5000/?x=1"  # only the first '=' separates key and value
    assert cfg.run.name == "with spaces"


def test_tracking_experiment_follows_run_experiment():
    assert load_config(None, ["run.experiment=abc"]).tracking.experiment == "abc"
    assert load_config("tiny-cpu", ["run.experiment=abc"]).tracking.experiment == "abc"
    assert load_config("llama3.2-3b-fp8", ["run.experiment=abc"]).tracking.experiment == "abc"
    assert load_config(None, ["run.experiment=abc", "tracking.experiment=xyz"]).tracking.experiment == "xyz"


def test_overrides_apply_on_top_of_a_preset(tmp_path):
    path = write_yaml(tmp_path, {**NAMED, "train": {"lr": 0.5, "max_steps": 9}})
    cfg = load_config(path, ["train.lr=0.25"])
    assert (cfg.train.lr, cfg.train.max_steps, cfg.train.workers) == (0.25, 9, TrainConfig().workers)


def test_exponent_strings_in_yaml_are_floats(tmp_path):
    # PyYAML reads `1e-4` (no dot) as a string; float fields accept it anyway.
    path = tmp_path / "p.yaml"
    others = {section: values for section, values in NAMED.items() if section != "train"}
    path.write_text(yaml.safe_dump(others) + "train:\n  max_steps: 1000\n  lr: 1e-4\n")
    assert load_config(str(path)).train.lr == pytest.approx(1e-4)


@pytest.mark.parametrize("override, message", [
    ("train.learning_rate=1e-4", "unknown key 'train.learning_rate' (did you mean 'train.lr'?)"),
    ("data.seqlen=64", "unknown key 'data.seqlen' (did you mean 'data.seq_len'?)"),
    ("trian.lr=1", "unknown key 'trian.lr' (did you mean 'train.lr'?)"),
    ("train.gradient_accumulation_steps=2", "(did you mean 'train.grad_accum_steps'?)"),
    ("train.zzzzzz=1", "unknown key 'train.zzzzzz'"),
])
def test_unknown_override_key_suggests_closest(override, message):
    with pytest.raises(PipelineError) as err:
        load_config(None, [override])
    assert message in str(err.value)


def test_unknown_yaml_keys_and_sections(tmp_path):
    suggestion = r"unknown key 'eval.max_batch' \(did you mean 'eval.max_batches'\?\)"
    with pytest.raises(PipelineError, match=suggestion):
        load_config(write_yaml(tmp_path, {"eval": {"max_batch": 3}}))
    with pytest.raises(PipelineError, match=r"unknown key 'trainer' \(did you mean 'train'\?\)"):
        load_config(write_yaml(tmp_path, {"trainer": {"lr": 1.0}}))


@pytest.mark.parametrize("override, message", [
    ("train.workers=two", "train.workers: expected int, got str 'two'"),
    ("train.workers=2.5", "train.workers: expected int, got float 2.5"),
    ("train.use_gpu=1", "train.use_gpu: expected bool (true/false), got int 1"),
    ("train.lr=fast", "train.lr: expected float, got str 'fast'"),
    ("model.dtype=fp16", "model.dtype: expected one of 'bf16', 'fp32', got str 'fp16'"),
    ("data.train_files=x.jsonl", "data.train_files: expected list of str, got str 'x.jsonl'"),
    ("eval.prompts=[ok, 3]", "eval.prompts[1]: expected str, got int 3"),
    ("data.max_documents=lots", "data.max_documents: expected int or null, got str 'lots'"),
])
def test_wrong_types_name_key_and_expected_type(override, message):
    with pytest.raises(PipelineError) as err:
        load_config(None, [override])
    assert str(err.value) == message


@pytest.mark.parametrize("override, message", [
    ("data.seq_len=100", "data.seq_len must be >= 16 and a multiple of 16 (got 100)"),
    ("data.seq_len=0", "data.seq_len must be >= 16"),
    ("data.val_fraction=1.0", "data.val_fraction must be in [0, 1)"),
    ("train.lr=0", "train.lr must be > 0"),
    ("train.warmup_steps=100", "train.warmup_steps must be <= train.max_steps"),
    ("train.fp8=delayed", "train.fp8 needs GPU workers: set train.use_gpu=true, or train.fp8=none"),
    ("train.fp8_attention=true", "train.fp8_attention needs train.fp8 set to delayed or current, not 'none'"),
    ("train.fp8_fast_accumulation=true", "train.fp8_fast_accumulation true needs train.fp8 set to delayed or "
                                         "current, not 'none'; leave it null or set it false"),
    ("train.fp8_head=true", "train.fp8_head true needs train.fp8 set to a recipe (the head runs in FP8 beside FP8 "
                            "layers); leave it null or set it false"),
    ("train.recast_fp8_weights=true", "train.recast_fp8_weights true needs train.fp8 set to a recipe (without FP8 "
                                      "there are no FP8 weights to cast)"),
    ("train.fp8_weights_from_update=true", "train.fp8_weights_from_update needs train.fp8=delayed (the scale it "
                                           "casts with is delayed scaling's), not 'none'"),
    ("storage.max_attempts=0", "storage.max_attempts must be >= 1"),
    ("storage.read_timeout_s=0", "storage.read_timeout_s must be > 0"),
    ("train.global_batch_size=12", "train.global_batch_size must be a multiple of train.workers x "
                                   "train.micro_batch_size = 2 x 4 = 8"),
    ("export.max_shard_size=big", "export.max_shard_size must look like 2GB"),
    ("run.cache_dir=s3://b/cache", "run.cache_dir must be a local path"),
])
def test_out_of_range_values_name_the_key(override, message):
    with pytest.raises(PipelineError, match=re.escape(message)):
        load_config(None, [override])


@pytest.mark.parametrize("other, message", [
    ("train.cuda_graphs=true", "cannot be combined with train.cuda_graphs"),
    ("train.recast_fp8_weights=true", "cannot be combined with train.recast_fp8_weights"),
    ("train.recompute_mlp=true", "cannot be combined with train.recompute_mlp"),
    ("train.parallelism=fsdp", "needs train.parallelism=ddp (fsdp shards the weights it would write whole)"),
    ("train.fp8=current", "needs train.fp8=delayed (the scale it casts with is delayed scaling's), not 'current'"),
])
def test_fp8_weights_from_update_refuses_what_it_cannot_serve(other, message):
    gpu = ["train.use_gpu=true", "train.fp8=delayed", "train.fp8_weights_from_update=true"]
    assert load_config(None, gpu).train.fp8_weights_from_update is True
    with pytest.raises(PipelineError, match=re.escape(f"train.fp8_weights_from_update {message}")):
        load_config(None, [*gpu, other])


@pytest.mark.parametrize("recipe, on", [("none", False), ("delayed", True), ("current", True), ("block", False),
                                        ("mxfp8", False)])
def test_fast_accumulation_is_on_where_the_recipe_allows_it_unless_turned_off(recipe, on):
    gpu = ["train.use_gpu=true", f"train.fp8={recipe}"]
    assert load_config(None, gpu).train.fast_accumulation is on
    assert load_config(None, [*gpu, "train.fp8_fast_accumulation=false"]).train.fast_accumulation is False
    if on:
        assert load_config(None, [*gpu, "train.fp8_fast_accumulation=true"]).train.fast_accumulation is True
    else:
        with pytest.raises(PipelineError, match="train.fp8_fast_accumulation true needs train.fp8 set to delayed"):
            load_config(None, [*gpu, "train.fp8_fast_accumulation=true"])


def test_the_config_knows_the_per_tensor_recipes_te_model_knows():
    from pipeline import config
    from te_model import fp8

    assert config.PER_TENSOR_RECIPES == fp8.PER_TENSOR_RECIPES


def test_mlp_recompute_inside_whole_layer_recompute_is_refused():
    assert load_config(None, ["train.recompute_mlp=true"]).train.recompute_mlp is True
    with pytest.raises(PipelineError) as caught:
        load_config(None, ["train.recompute_mlp=true", "train.activation_checkpointing=true"])
    assert str(caught.value) == ("train.recompute_mlp has no use with train.activation_checkpointing=true, "
                                 "which recomputes whole layers (got True)")


def test_fp8_moments_are_off_unless_asked_for():
    assert load_config(None).train.moments_fp8 is False
    assert load_config(None, ["train.moments_fp8=true"]).train.moments_fp8 is True
    refused = "train.moments_fp8: expected bool (true/false), got str 'maybe'"
    with pytest.raises(PipelineError, match=re.escape(refused)):
        load_config(None, ["train.moments_fp8=maybe"])


def test_global_batch_size_sets_grad_accum_steps():
    assert load_config(None, ["train.global_batch_size=32"]).train.grad_accum_steps == 4
    cfg = load_config(None, ["train.global_batch_size=32", "train.workers=4"])
    assert cfg.train.grad_accum_steps == 2 and Config.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(PipelineError, match="train.grad_accum_steps contradicts train.global_batch_size"):
        load_config(None, ["train.global_batch_size=32", "train.grad_accum_steps=3"])


def test_sections_validate_when_built_directly():
    with pytest.raises(PipelineError, match=r"^data.seq_len must be"):
        DataConfig(seq_len=8)
    assert TrainConfig(lr=1).lr == 1.0 and isinstance(TrainConfig(lr=1).lr, float)


def test_malformed_override_and_files(tmp_path):
    with pytest.raises(PipelineError, match="must look like section.key=value"):
        load_config(None, ["train.lr"])
    with pytest.raises(PipelineError, match="config file not found"):
        load_config(str(tmp_path / "missing.yaml"))
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(PipelineError, match="top level must be a mapping"):
        load_config(str(tmp_path / "list.yaml"))
    (tmp_path / "bad.yaml").write_text("train: [unclosed\n")
    with pytest.raises(PipelineError, match="invalid YAML"):
        load_config(str(tmp_path / "bad.yaml"))


def test_dict_yaml_round_trip_and_flat_params(tmp_path):
    cfg = load_config("llama3.2-3b-fp8", ["train.lr=3e-5", "data.chat_template={{ bos_token }}"])
    assert Config.from_dict(cfg.to_dict()) == cfg
    path = tmp_path / "dumped.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(str(path)) == cfg
    flat = cfg.flat_params()
    assert list(flat) == valid_keys()
    assert flat["train.lr"] == pytest.approx(3e-5) and flat["model.dtype"] == "bf16"
    assert flat["data.chat_template"] == "{{ bos_token }}"


def test_cuda_graphs_are_refused_where_they_cannot_run():
    on = ["train.cuda_graphs=true", "train.use_gpu=true", "train.workers=1"]
    assert load_config(None, on).train.cuda_graphs is True
    for extra, message in (
            (["train.use_gpu=false"], "train.cuda_graphs needs GPU workers (train.use_gpu=true) (got True)"),
            (["train.workers=2"],
             "train.cuda_graphs runs on one worker; set train.workers=1 or turn it off (got True)"),
            (["train.recompute_mlp=true"], "train.cuda_graphs cannot be combined with train.recompute_mlp (got True)"),
            (["train.activation_checkpointing=true"],
             "train.cuda_graphs cannot be combined with train.activation_checkpointing (got True)")):
        with pytest.raises(PipelineError) as caught:
            load_config(None, [*on, *extra])
        assert str(caught.value) == message
