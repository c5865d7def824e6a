"""Reading the data inputs: files and `datasets` folders in, documents in the configured format out.

Data preparation must hash exactly the bytes it tokenizes, and point at the file and line of any bad
record. So this module reads every input once into memory (`read_source`) and turns its records into
documents (`documents`); `pipeline.stages.data` hashes the same bytes and tokenizes the documents. A bad
record is a `PipelineError` naming the file and line or row, the field, what is wrong and the fix.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.config import DataConfig
from pipeline.errors import PipelineError

_FILE_KINDS = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
# Roles of Llama chat templates (3.1 adds `ipython` for tool output); anything else is a conversion mistake.
CHAT_ROLES = ("system", "user", "assistant", "tool", "ipython")
# The prompt of instruction records; inference must use the same (`format_instruction_prompt`).
INSTRUCTION_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
INSTRUCTION_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
    "### Input:\n{input}\n\n### Response:\n")


def format_instruction_prompt(instruction: str, input_text: str = "") -> str:
    """The Alpaca-style prompt the model is trained on; use the same at inference."""
    if input_text and input_text.strip():
        return INSTRUCTION_PROMPT_WITH_INPUT.format(instruction=instruction, input=input_text)
    return INSTRUCTION_PROMPT.format(instruction=instruction)


@dataclass
class Source:
    """One input uri read into memory: a file, or the arrow files of a `save_to_disk` folder."""

    uri: str
    kind: str
    blobs: dict[str, bytes]  # relative name -> bytes; "" for a single file


def read_source(uri: str, options: storage.StorageOptions) -> Source:
    """The bytes of the input at `uri`: the file, or the arrow files of a one-split datasets folder.

    The kind comes from the suffix: .jsonl, .json (a JSON array or JSON lines), .parquet, .csv. Any
    other uri must be a `datasets` `save_to_disk` folder of one split. A DatasetDict folder is refused,
    naming the split folder to point at instead.
    """
    kind = _FILE_KINDS.get(Path(uri.rstrip("/")).suffix.lower())
    if not storage.exists(uri, options):
        raise PipelineError(f"input not found: {uri}; fix the uri or upload the file")
    if kind:
        return Source(uri, kind, {"": storage.read_bytes(uri, options)})
    fs, path = storage.filesystem(uri, options)
    names = storage.list_files(uri, options) if fs.isdir(path) else {}
    if "dataset_dict.json" in names:
        example = storage.join(uri, "train")
        raise PipelineError(f"{uri} is a DatasetDict: point at one split's folder (e.g. {example})")
    if "state.json" not in names:
        raise PipelineError(f"unsupported input {uri}: expected .jsonl/.json/.parquet/.csv "
                            "or a datasets save_to_disk folder")
    where = storage.join(uri, "state.json")
    try:
        state = json.loads(storage.read_bytes(where, options))
    except ValueError as exc:
        raise PipelineError(f"{where}: invalid JSON ({exc}); save the dataset again") from None
    arrow_files = [entry["filename"] for entry in state.get("_data_files", [])]
    return Source(uri, "arrow", {n: storage.read_bytes(storage.join(uri, n), options) for n in arrow_files})


def _records(source: Source) -> list[tuple[str, dict]]:
    """(where, record) pairs of a source, `where` naming file and line/row for error messages."""
    blob = source.blobs.get("", b"")
    if source.kind in ("jsonl", "json"):
        text = _utf8(blob, source.uri)
        try:
            whole = json.loads(text) if source.kind == "json" else None
        except json.JSONDecodeError:
            whole = None  # a .json file holding JSON lines
        if isinstance(whole, list):
            return [(f"{source.uri} row {i}", r) for i, r in enumerate(whole)]
        return [(f"{source.uri}:{n}", _json_line(line, source.uri, n))
                for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if source.kind == "csv":
        rows = csv.DictReader(io.StringIO(_utf8(blob, source.uri)))
        return [(f"{source.uri} row {i}", r) for i, r in enumerate(rows)]
    try:
        if source.kind == "parquet":
            tables = [pq.read_table(io.BytesIO(blob))]
        else:
            tables = [pa.ipc.open_stream(io.BytesIO(b)).read_all() for b in source.blobs.values()]
    except pa.ArrowException as exc:
        raise PipelineError(f"{source.uri}: unreadable {source.kind} data ({str(exc).splitlines()[0]}); "
                            "write it again, or convert it to JSON lines") from None
    rows = [r for table in tables for r in table.to_pylist()]
    return [(f"{source.uri} row {i}", r) for i, r in enumerate(rows)]


def _utf8(blob: bytes, uri: str) -> str:
    try:
        return blob.decode("utf-8-sig")  # a leading byte-order mark (Excel, Notepad) is dropped
    except UnicodeDecodeError as exc:
        line = blob.count(b"\n", 0, exc.start) + 1
        raise PipelineError(f"{uri}:{line}: not UTF-8 (byte 0x{blob[exc.start]:02x} at offset {exc.start}); "
                            "re-encode the file as UTF-8, e.g. iconv -f latin1 -t utf-8") from None


def _json_line(line: str, uri: str, line_no: int) -> dict:
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise PipelineError(f"{uri}:{line_no}: invalid JSON ({exc.msg} at column {exc.colno}); "
                            "fix or remove that line") from None


def _field(record: Any, name: str, where: str, fix: str, required: bool = True) -> str:
    if not isinstance(record, dict):
        raise PipelineError(f"{where}: expected an object, got {type(record).__name__}")
    value = record.get(name)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        problem = "missing" if name not in record else f"not a string ({type(value).__name__})"
        fields = ", ".join(map(str, record)) or "none"
        raise PipelineError(f"{where}: field '{name}' is {problem} (fields: {fields}); {fix}")
    return value


def _chat_messages(record: Any, where: str) -> list[dict]:
    messages = record.get("messages") if isinstance(record, dict) else None
    well_formed = isinstance(messages, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in messages)
    if not well_formed:
        raise PipelineError(f"{where}: 'messages' must be a list of {{role, content}} strings")
    for i, message in enumerate(messages):
        if message["role"] not in CHAT_ROLES:
            raise PipelineError(f"{where}: message {i} has role {message['role']!r}; use one of "
                                f"{', '.join(CHAT_ROLES)} (ShareGPT's human/gpt are user/assistant)")
    return messages


def _document(record: Any, where: str, data: DataConfig) -> dict[str, str]:
    """A record in the column layout of its format: text | prompt+response | messages (JSON)."""
    if data.format == "text":
        fix = "set data.text_field to the column holding the text, or data.format to match the records"
        return {"text": _field(record, data.text_field, where, fix)}
    if data.format == "instruction":
        fix = "instruction records need 'instruction' and 'output' strings (and an optional 'input')"
        instruction = _field(record, "instruction", where, fix)
        input_text = _field(record, "input", where, fix, required=False)
        return {"prompt": format_instruction_prompt(instruction, input_text),
                "response": _field(record, "output", where, fix)}
    return {"messages": json.dumps(_chat_messages(record, where)), "where": where}


def documents(sources: list[Source], data: DataConfig) -> list[dict[str, str]]:
    """The documents of every record of `sources`, in order, at most `data.max_documents`.

    A record becomes a document by `data.format`:
    - text: {text}, from `data.text_field`;
    - instruction: {prompt, response}. The prompt is the Alpaca-style `format_instruction_prompt` of
      `instruction` and the optional `input`; the response is `output`;
    - chat: {messages, where}, the `messages` list of {role, content} strings kept as JSON.
    An empty input, one that is not UTF-8, and a chat role outside `CHAT_ROLES` are errors too.
    """
    docs = []
    for source in sources:
        records = _records(source)
        if not records:
            raise PipelineError(f"{source.uri}: holds no records (empty input); "
                                "remove it from the data files or point at the right one")
        docs += [_document(record, where, data) for where, record in records]
    return docs[: data.max_documents] if data.max_documents else docs
