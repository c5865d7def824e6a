"""Data preparation on real files: tiny tokenizer/checkpoint, formats, label masks, packing, cache, S3."""

from __future__ import annotations

import csv
import io
import json
import shutil
from collections import Counter
from pathlib import Path

import datasets
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer, LlamaForCausalLM

from pipeline import demo, storage
from pipeline.config import Config, DataConfig, RunConfig, StorageConfig
from pipeline.stages.data import IGNORE_INDEX, format_instruction_prompt, pack_documents, prepare
from pipeline.errors import PipelineError

TEXTS = ["The baker lit the oven before dawn.", "Birds sing in the morning.",
         "The old boat drifted slowly past the mill, and the children waved from the bridge."]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("tokenizer")
    demo.make_tokenizer(out)
    return str(out)


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def write_jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def make_cfg(tmp_path: Path, train_files: list[str], output_uri: str | None = None, seed: int = 0,
             endpoint_url: str | None = None, **data) -> Config:
    data.setdefault("val_fraction", 0.0)
    data.setdefault("seq_len", 128)  # rows a few of the shipped text's documents long
    run = RunConfig(output_uri=output_uri or str(tmp_path / "out"), cache_dir=str(tmp_path / "node"),
                    seed=seed)
    return Config(run=run, storage=StorageConfig(endpoint_url=endpoint_url),
                  data=DataConfig(train_files=train_files, **data))


def read_rows(uri: str, endpoint_url: str | None = None) -> list[dict]:
    blob = storage.read_bytes(uri, storage.StorageOptions(endpoint_url=endpoint_url))
    return pq.read_table(io.BytesIO(blob)).to_pylist()


def segments(row: dict) -> list[dict]:
    """Split a packed row where position_ids restart at 0, checking positions count up inside each segment."""
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
    found = []
    for begin, end in zip(starts, starts[1:]):
        assert row["position_ids"][begin:end] == list(range(end - begin))
        found.append({"ids": row["input_ids"][begin:end], "labels": row["labels"][begin:end]})
    return found


def trained_spans(ids: list[int], labels: list[int]) -> list[list[int]]:
    """Maximal runs of trained tokens; every trained label must equal its input id."""
    spans, current = [], []
    for token, label in zip(ids, labels):
        if label == IGNORE_INDEX:
            spans, current = (spans + [current] if current else spans), []
        else:
            assert label == token
            current.append(token)
    return spans + [current] if current else spans


def documents_of(prepared) -> list[dict]:
    """Non-padding segments of all train rows."""
    docs = []
    for row in read_rows(prepared.train_uri):
        lengths = {len(row["input_ids"]), len(row["labels"]), len(row["position_ids"])}
        assert lengths == {prepared.stats["seq_len"]}
        docs += [s for s in segments(row) if s["ids"][0] == 1]
    return docs


# ---------------------------------------------------------------- tiny assets

def test_tiny_checkpoint_is_a_deterministic_sharded_llama(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    demo.make_tiny_checkpoint(first)
    demo.make_tiny_checkpoint(second)
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in second.iterdir())
    assert all((first / n).read_bytes() == (second / n).read_bytes() for n in names)
    index = json.loads((first / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    model = LlamaForCausalLM.from_pretrained(first)
    tok = AutoTokenizer.from_pretrained(first)
    assert model.config.vocab_size == len(tok) and model.config.num_hidden_layers == 2
    assert model.config.rope_parameters["rope_theta"] == 500000 and not model.config.tie_word_embeddings
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", None)
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert chat == ("<s><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert tok.decode(tok("The old mill.")["input_ids"]) == "<s>The old mill."


def test_ensure_demo_base_builds_once(tmp_path):
    base = demo.ensure_built_base(tmp_path / "store")
    assert base == tmp_path / "store" / "tiny-llama"
    assert (base / ".complete").exists() and (base / "manifest.json").exists()
    stamp = (base / "config.json").stat().st_mtime_ns
    assert demo.ensure_built_base(tmp_path / "store") == base
    assert (base / "config.json").stat().st_mtime_ns == stamp
    assert [p.name for p in (tmp_path / "store").iterdir()] == ["tiny-llama"]  # no staging left behind


def test_every_base_a_config_may_leave_to_the_job_has_a_shape(tmp_path, monkeypatch):
    from pipeline.config import BUILT_BASES, built_base, load_config

    assert set(BUILT_BASES) == set(demo.BUILT_SHAPES)
    assert built_base(load_config(None).model.base_uri) == "tiny-llama"
    assert built_base(load_config("gpu-small-fp8").model.base_uri) == "gpu-small-llama"
    assert built_base(".cache/demo-store/other") is None and built_base("s3://b/.cache/demo-store/tiny-llama") is None
    monkeypatch.setitem(demo.BUILT_SHAPES, "gpu-small-llama", {"layers": 1})  # its plumbing, not its 380M weights
    base = demo.ensure_built_base(tmp_path / "store", "gpu-small-llama")
    assert base == tmp_path / "store" / "gpu-small-llama" and (base / ".complete").exists()
    assert json.loads((base / "config.json").read_text())["num_hidden_layers"] == 1


# ---------------------------------------------------------------- formats and special tokens

def test_text_documents_get_bos_eos_and_eos_padding(tmp_path, tokenizer_dir, tokenizer):
    data = write_jsonl(tmp_path / "t.jsonl", [{"body": t} for t in TEXTS])
    prepared = prepare(make_cfg(tmp_path, [data], text_field="body", seq_len=64), tokenizer_dir)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    assert (prepared.stats["pad_token_id"], prepared.stats["pad_token_source"]) == (eos, "eos_token")
    expected = {tuple([bos] + tokenizer(t, add_special_tokens=False)["input_ids"] + [eos]) for t in TEXTS}
    docs = documents_of(prepared)
    assert {tuple(d["ids"]) for d in docs} == expected
    for doc in docs:
        assert doc["labels"] == [IGNORE_INDEX] + doc["ids"][1:]
    for row in read_rows(prepared.train_uri):
        pad = segments(row)[-1]
        if pad["ids"][0] != bos:  # a trailing pad segment: pad ids, never trained
            assert set(pad["ids"]) == {eos} and set(pad["labels"]) == {IGNORE_INDEX}
    stats = prepared.stats["train"]
    assert stats["documents"] == 3 and stats["tokens"] == sum(map(len, expected))
    assert stats["trained_tokens"] == stats["tokens"] - 3


def test_bos_and_eos_can_be_switched_off(tmp_path, tokenizer_dir, tokenizer):
    data = write_jsonl(tmp_path / "t.jsonl", [{"text": TEXTS[0]}])
    prepared = prepare(make_cfg(tmp_path, [data], add_bos=False, add_eos=False, seq_len=32), tokenizer_dir)
    row = read_rows(prepared.train_uri)[0]
    plain = tokenizer(TEXTS[0], add_special_tokens=False)["input_ids"]
    assert row["input_ids"][: len(plain)] == plain
    assert row["labels"][: len(plain)] == [IGNORE_INDEX] + plain[1:]
    assert prepared.stats["bos_token_id"] is None and prepared.stats["eos_token_id"] is None


def test_tokenizer_pad_token_is_preferred(tmp_path, tokenizer_dir):
    padded_dir = tmp_path / "padded"
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.add_special_tokens({"pad_token": "<pad>"})
    tok.save_pretrained(padded_dir)
    data = write_jsonl(tmp_path / "t.jsonl", [{"text": TEXTS[1]}])
    prepared = prepare(make_cfg(tmp_path, [data], seq_len=32), str(padded_dir))
    assert prepared.stats["pad_token_source"] == "pad_token"
    assert prepared.stats["pad_token_id"] == tok.pad_token_id != tok.eos_token_id
    assert read_rows(prepared.train_uri)[0]["input_ids"][-1] == tok.pad_token_id


def test_instruction_prompt_is_masked_and_response_trained(tmp_path, tokenizer_dir, tokenizer):
    records = [{"instruction": "Add the two numbers.", "input": "2 and 3", "output": "2 plus 3 is 5."},
               {"instruction": "What do bees make?", "input": "", "output": "Bees make honey."}]
    data = write_jsonl(tmp_path / "i.jsonl", records)
    prepared = prepare(make_cfg(tmp_path, [data], format="instruction", seq_len=256), tokenizer_dir)
    docs = sorted(documents_of(prepared), key=lambda d: len(d["ids"]), reverse=True)
    assert len(docs) == 2
    for doc, record in zip(docs, records):
        masked = [t for t, label in zip(doc["ids"], doc["labels"]) if label == IGNORE_INDEX]
        prompt = format_instruction_prompt(record["instruction"], record["input"])
        assert tokenizer.decode(masked) == "<s>" + prompt
        [span] = trained_spans(doc["ids"], doc["labels"])
        assert tokenizer.decode(span) == record["output"] + "</s>"
        assert doc["ids"][-len(span):] == span  # the trained part is the tail of the document


def test_chat_trains_only_assistant_turns(tmp_path, tokenizer_dir, tokenizer):
    turns = [("system", "Be brief."), ("user", "What day is after Monday?"), ("assistant", "Tuesday."),
             ("user", "And then?"), ("assistant", "Wednesday.")]
    messages = [{"role": role, "content": content} for role, content in turns]
    data = write_jsonl(tmp_path / "c.jsonl", [{"messages": messages}])
    prepared = prepare(make_cfg(tmp_path, [data], format="chat", seq_len=128), tokenizer_dir)
    [doc] = documents_of(prepared)
    assert doc["ids"][0] == tokenizer.bos_token_id != doc["ids"][1]  # the template's BOS is not doubled
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert tokenizer.decode(doc["ids"]) == rendered + "</s>"
    spans = [tokenizer.decode(s) for s in trained_spans(doc["ids"], doc["labels"])]
    assert spans == ["Tuesday.<|eot_id|>", "Wednesday.<|eot_id|></s>"]


def test_chat_needs_a_template(tmp_path, tokenizer_dir):
    bare_dir = tmp_path / "bare"
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.chat_template = None
    tok.save_pretrained(bare_dir)
    data = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "Hi"},
                                                            {"role": "assistant", "content": "Hello."}]}])
    with pytest.raises(PipelineError, match="tokenizer has no chat template; set data.chat_template"):
        prepare(make_cfg(tmp_path, [data], format="chat"), str(bare_dir))
    cfg = make_cfg(tmp_path, [data], format="chat", chat_template=demo.LLAMA3_CHAT_TEMPLATE)
    prepared = prepare(cfg, str(bare_dir))
    assert prepared.stats["train"]["trained_tokens"] > 0


def test_chat_template_that_rewrites_history_is_rejected(tmp_path, tokenizer_dir):
    counting = "{{ messages|length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    data = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "Hi"},
                                                            {"role": "assistant", "content": "Hello."}]}])
    with pytest.raises(PipelineError, match=r"c.jsonl:1: chat template does not render message 1"):
        prepare(make_cfg(tmp_path, [data], format="chat", chat_template=counting), tokenizer_dir)


@pytest.mark.parametrize("line, message", [
    ('{"txt": "x"}', r"bad.jsonl:2: field 'text' is missing \(fields: txt\); set data.text_field"),
    ('{"text": 3}', r"bad.jsonl:2: field 'text' is not a string \(int\)"),
    ("{not json", r"bad.jsonl:2: invalid JSON"),
])
def test_bad_records_name_file_and_line(tmp_path, tokenizer_dir, line, message):
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(PipelineError, match=message):
        prepare(make_cfg(tmp_path, [str(tmp_path / "bad.jsonl")]), tokenizer_dir)


def test_unsupported_input_is_named(tmp_path, tokenizer_dir):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(PipelineError, match=r"unsupported input .*notes.txt: expected .jsonl"):
        prepare(make_cfg(tmp_path, [str(tmp_path / "notes.txt")]), tokenizer_dir)
    with pytest.raises(PipelineError, match=r"data.train_files\[0\]: input not found: .*missing.jsonl; fix the uri"):
        prepare(make_cfg(tmp_path, [str(tmp_path / "missing.jsonl")]), tokenizer_dir)
    with pytest.raises(PipelineError, match=r"unsupported input .*empty: expected .jsonl"):
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "a.bin").write_bytes(b"x")
        prepare(make_cfg(tmp_path, [str(tmp_path / "empty")]), tokenizer_dir)


# ---------------------------------------------------------------- packing and splitting

def test_best_fit_packing_fills_rows():
    docs = [([1] * n, [1] * n) for n in (3, 6, 10, 4, 6, 3)]
    columns = pack_documents(docs, seq_len=16, pad_id=0, seed=0)
    assert len(columns["input_ids"]) == 2 and all(len(r) == 16 for r in columns["input_ids"])
    assert 0 not in [t for row in columns["input_ids"] for t in row]  # 32 tokens in 2x16 slots: no padding


def test_packing_keeps_documents_whole_and_counts_truncation(tmp_path, tokenizer_dir, tokenizer):
    texts = [" ".join(["word"] * n) + "." for n in (1, 3, 5, 8, 2, 4, 4, 6, 1, 2, 7)]
    long_text = " ".join(["river"] * 80)
    records = [{"text": t} for t in texts] + [{"text": long_text}, {"text": "   "}]
    data = write_jsonl(tmp_path / "p.jsonl", records)
    prepared = prepare(make_cfg(tmp_path, [data], seq_len=32), tokenizer_dir)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    stats = prepared.stats
    assert (stats["truncated"], stats["dropped_empty"], stats["dropped"], stats["documents"]) == (1, 1, 1, 13)
    plain = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    expected = Counter(tuple([bos] + ids + [eos]) for ids in plain)
    expected[tuple(([bos] + tokenizer(long_text, add_special_tokens=False)["input_ids"])[:32])] += 1
    for row in read_rows(prepared.train_uri):
        parts = segments(row)
        # Only the last segment may be padding; every other segment is a document starting with BOS.
        assert all(p["ids"][0] == bos for p in parts[:-1])
        if parts[-1]["ids"][0] != bos:
            assert set(parts[-1]["ids"]) == {eos} and set(parts[-1]["labels"]) == {IGNORE_INDEX}
    assert Counter(tuple(d["ids"]) for d in documents_of(prepared)) == expected  # each document whole, once
    assert stats["train"]["rows"] < len(texts) + 1  # short documents share rows


def test_shipped_text_packs_tightly(tmp_path, tokenizer_dir):
    cfg = make_cfg(tmp_path, [str(demo.SHIPPED_CORPUS[0])], seq_len=128, val_fraction=0.1)
    prepared = prepare(cfg, tokenizer_dir)
    stats = prepared.stats
    assert stats["train"]["documents"] + stats["validation"]["documents"] == 360
    assert stats["train"]["padding_waste"] < 0.2 and prepared.val_uri is not None


def test_validation_split_is_deterministic_by_seed(tmp_path, tokenizer_dir, tokenizer):
    texts = [f"Document number {i} is about the mill." for i in range(20)]
    data = write_jsonl(tmp_path / "s.jsonl", [{"text": t} for t in texts])

    def split(seed: int, out: str) -> tuple[set, set]:
        prepared = prepare(make_cfg(tmp_path, [data], output_uri=str(tmp_path / out), seed=seed,
                                    val_fraction=0.25), tokenizer_dir)
        train = {tokenizer.decode(d["ids"][1:-1]) for d in documents_of(prepared)}
        val = {tokenizer.decode(s["ids"][1:-1]) for row in read_rows(prepared.val_uri) for s in segments(row)
               if s["ids"][0] == tokenizer.bos_token_id}
        return train, val

    train, val = split(0, "a")
    assert len(val) == 5 and train | val == set(texts) and not train & val
    assert split(0, "b") == (train, val)
    assert split(1, "c")[1] != val


def test_validation_files_replace_the_held_out_share(tmp_path, tokenizer_dir):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": t} for t in TEXTS])
    val = write_jsonl(tmp_path / "val.jsonl", [{"text": "A held out sentence."}])
    cfg = make_cfg(tmp_path, [train], validation_files=[val], val_fraction=0.5)
    stats = prepare(cfg, tokenizer_dir).stats
    assert (stats["train"]["documents"], stats["validation"]["documents"]) == (3, 1)


# ---------------------------------------------------------------- cache, input kinds, storage

def test_cache_hits_on_same_inputs_and_misses_on_any_change(tmp_path, tokenizer_dir):
    data = tmp_path / "c.jsonl"
    write_jsonl(data, [{"text": t} for t in TEXTS])
    tok_copy = tmp_path / "tok"
    shutil.copytree(tokenizer_dir, tok_copy)
    first = prepare(make_cfg(tmp_path, [str(data)]), str(tok_copy))
    assert not first.cache_hit
    again = prepare(make_cfg(tmp_path, [str(data)], num_proc=2), str(tok_copy))  # num_proc never changes rows
    assert again.cache_hit and again.uri == first.uri and again.stats["train"] == first.stats["train"]
    seen = {first.uri}

    def assert_miss(cfg: Config) -> None:
        prepared = prepare(cfg, str(tok_copy))
        assert not prepared.cache_hit and prepared.uri not in seen
        seen.add(prepared.uri)

    data.write_bytes(data.read_bytes().replace(b"dawn", b"dawm", 1))  # one byte of input
    assert_miss(make_cfg(tmp_path, [str(data)]))
    config_file = tok_copy / "tokenizer_config.json"
    config_file.write_bytes(config_file.read_bytes().replace(b"2048", b"2049", 1))  # one tokenizer byte
    assert_miss(make_cfg(tmp_path, [str(data)]))
    assert_miss(make_cfg(tmp_path, [str(data)], add_eos=False))  # one setting
    assert_miss(make_cfg(tmp_path, [str(data)], seed=1))


def test_every_input_kind_gives_the_same_rows(tmp_path, tokenizer_dir):
    records = [{"text": t, "id": i} for i, t in enumerate(TEXTS)]
    paths = {"jsonl": write_jsonl(tmp_path / "d.jsonl", records), "json": str(tmp_path / "d.json")}
    Path(paths["json"]).write_text(json.dumps(records))
    table = datasets.Dataset.from_list(records)
    table.to_parquet(str(tmp_path / "d.parquet"))
    paths["parquet"] = str(tmp_path / "d.parquet")
    table.save_to_disk(str(tmp_path / "saved"))
    paths["saved"] = str(tmp_path / "saved")
    with open(tmp_path / "d.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["id", "text"])
        writer.writeheader()
        writer.writerows(records)
    paths["csv"] = str(tmp_path / "d.csv")
    rows = {kind: read_rows(prepare(make_cfg(tmp_path, [p], seq_len=64), tokenizer_dir).train_uri)
            for kind, p in paths.items()}
    assert all(r == rows["jsonl"] for r in rows.values())


def test_datasetdict_folder_is_rejected_with_a_hint(tmp_path, tokenizer_dir):
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list([{"text": "x"}])})
    splits.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(PipelineError, match=r"is a DatasetDict: point at one split's folder .*dd/train"):
        prepare(make_cfg(tmp_path, [str(tmp_path / "dd")]), tokenizer_dir)


def test_parallel_tokenization_matches_serial(tmp_path, tokenizer_dir):
    data = write_jsonl(tmp_path / "n.jsonl", [{"text": f"Line {i} of the tale."} for i in range(40)])
    serial = prepare(make_cfg(tmp_path, [data], output_uri=str(tmp_path / "one")), tokenizer_dir)
    cfg = make_cfg(tmp_path, [data], output_uri=str(tmp_path / "two"), num_proc=2)
    parallel = prepare(cfg, tokenizer_dir)
    assert read_rows(serial.train_uri) == read_rows(parallel.train_uri)


def test_file_uris_for_inputs_and_outputs(tmp_path, tokenizer_dir):
    data = write_jsonl(tmp_path / "f.jsonl", [{"text": t} for t in TEXTS])
    cfg = make_cfg(tmp_path, [f"file://{data}"], output_uri=f"file://{tmp_path}/store")
    prepared = prepare(cfg, f"file://{tokenizer_dir}")
    assert prepared.train_uri.startswith(f"file://{tmp_path}/store/data/")
    assert (tmp_path / "store" / "data" / prepared.uri.rsplit("/", 1)[-1] / "stats.json").is_file()
    assert prepare(cfg, f"file://{tokenizer_dir}").cache_hit


def test_inputs_outputs_and_tokenizer_in_s3(tmp_path, tokenizer_dir, s3_server, s3_bucket):
    client = s3_server.client()
    client.put_object(Bucket=s3_bucket, Key="datasets/train.jsonl",
                      Body="".join(json.dumps({"text": t}) + "\n" for t in TEXTS).encode())
    for path in Path(tokenizer_dir).iterdir():
        client.put_object(Bucket=s3_bucket, Key=f"models/tiny/{path.name}", Body=path.read_bytes())
    cfg = make_cfg(tmp_path, [f"s3://{s3_bucket}/datasets/train.jsonl"], output_uri=f"s3://{s3_bucket}/runs",
                   endpoint_url=s3_server.endpoint_url, seq_len=64)
    prepared = prepare(cfg, f"s3://{s3_bucket}/models/tiny")
    assert prepared.train_uri.startswith(f"s3://{s3_bucket}/runs/data/") and not prepared.cache_hit
    rows = read_rows(prepared.train_uri, s3_server.endpoint_url)
    assert sum(1 for row in rows for p in row["position_ids"] if p == 0) >= len(TEXTS)
    stats_key = prepared.uri.split("/", 3)[3] + "/stats.json"
    stats = json.loads(client.get_object(Bucket=s3_bucket, Key=stats_key)["Body"].read())
    assert stats["train"] == prepared.stats["train"]
    again = prepare(cfg, f"s3://{s3_bucket}/models/tiny")
    assert again.cache_hit and again.uri == prepared.uri


def test_command_line_runs_the_stage(tmp_path, tokenizer_dir, capsys):
    from pipeline.stages.data import main

    data = write_jsonl(tmp_path / "m.jsonl", [{"text": t} for t in TEXTS])
    args = ["--tokenizer", tokenizer_dir, f"data.train_files=[{data}]", f"run.output_uri={tmp_path}/out"]
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["train"]["documents"] + printed["validation"]["documents"] == 3
    assert main(["--tokenizer", tokenizer_dir, "data.seqlen=64"]) == 2
    assert "unknown key 'data.seqlen' (did you mean 'data.seq_len'?)" in capsys.readouterr().err


def test_a_process_connected_to_ray_tokenizes_without_forking(ray_cluster):
    from pipeline.config import DataConfig
    from pipeline.stages.data import _worker_processes

    assert _worker_processes(DataConfig(num_proc=1), 100) is None
    assert _worker_processes(DataConfig(num_proc=4), 1) is None
    assert _worker_processes(DataConfig(num_proc=4), 100) is None  # Ray is up in this process: no fork


@pytest.mark.parametrize("name, content", [
    ("bom.jsonl", '{"text": "one"}\n{"text": "two"}\n'),
    ("bom.csv", "text,other\none,x\ntwo,y\n"),
])
def test_a_utf8_byte_order_mark_is_accepted(tmp_path, name, content):
    from pipeline.stages.sources import documents, read_source

    (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + content.encode())
    docs = documents([read_source(str(tmp_path / name), storage.StorageOptions())], DataConfig())
    assert [d["text"] for d in docs] == ["one", "two"]
