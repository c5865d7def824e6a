"""The exported checkpoint folder made an MLflow model in place: an `MLmodel` file beside the weights.

Registry versions must load with `mlflow.transformers.load_model` and `mlflow.pyfunc.load_model`, while
the same folder stays a plain HF checkpoint for `from_pretrained`. `mlflow.transformers.save_model`
cannot give both without cost: it serializes the weights again, or copies them into `model/`. So
this module writes what `save_model` writes around the weights, and nothing else
(`write_mlflow_model` lists the files).
"""

from __future__ import annotations

import json
import platform
import shutil
from importlib import metadata
from pathlib import Path

import yaml

from pipeline.errors import PipelineError

MLMODEL_FILE = "MLmodel"
TOKENIZER_COMPONENT_DIR = Path("components") / "tokenizer"
TASK = "text-generation"
# Distributions the transformers flavor needs to load and run a text-generation pipeline.
_REQUIRED = ("mlflow", "transformers", "torch", "tokenizers", "safetensors", "accelerate")
# What pyfunc's `predict(..., params=...)` passes on to the pipeline; a param outside the schema is
# dropped by MLflow. Defaults: greedy, the completion only.
GENERATION_PARAMS = (("max_new_tokens", "long", 128), ("min_new_tokens", "long", 0), ("do_sample", "boolean", False),
                     ("temperature", "double", 1.0), ("top_p", "double", 1.0), ("return_full_text", "boolean", False))
_TORCH_DTYPES = {"bfloat16": "torch.bfloat16", "float32": "torch.float32", "float16": "torch.float16"}


def _pinned(distribution: str) -> str | None:
    try:
        version = metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None
    return f"{distribution}=={version.split('+')[0]}"  # a local label (+cpu, +cu128) is not on PyPI


def _requirements() -> list[str]:
    return [pin for pin in map(_pinned, _REQUIRED) if pin]


def _write_environment(folder: Path) -> None:
    requirements = _requirements()
    (folder / "requirements.txt").write_text("\n".join(requirements) + "\n")
    python = platform.python_version()
    pip = _pinned("pip") or "pip"
    python_env = {"python": python, "build_dependencies": [pip, "setuptools", "wheel"],
                  "dependencies": ["-r requirements.txt"]}
    (folder / "python_env.yaml").write_text(yaml.safe_dump(python_env, sort_keys=False))
    conda = {"name": "mlflow-env", "channels": ["conda-forge"],
             "dependencies": [f"python={python}", "pip", {"pip": requirements}]}
    (folder / "conda.yaml").write_text(yaml.safe_dump(conda, sort_keys=False))


def write_mlflow_model(folder: str | Path, tokenizer_files: list[str], source_model: str) -> Path:
    """Make the HF checkpoint in `folder` an MLflow transformers model; returns the MLmodel path.

    `tokenizer_files`: names of the tokenizer files in `folder` (copied into the flavor's component
    folder). `source_model`: where the weights came from (recorded in the flavor, for people).

    - `MLmodel` with the `transformers` flavor (task `text-generation`) and the `python_function`
      flavor, written through MLflow's `Model` API. `model_binary: "."` points the flavor at the folder.
    - `components/tokenizer/`: a copy of the tokenizer files, where the flavor reads its tokenizer. The
      class is `AutoTokenizer`: for a class name transformers does not define, MLflow would trust the
      checkpoint's remote code, which this project never allows.
    - `requirements.txt`, `python_env.yaml`, `conda.yaml`: the versions of this process's packages that
      loading needs. Written here, because MLflow's inference of them imports the model.

    `save_model` from a local checkpoint path also fails with MLflow 3.17 and transformers 5:
    `check_task` returns the pipeline class as a string.
    """
    from mlflow.models import Model, ModelSignature
    from mlflow.pyfunc import add_to_model
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    architectures = config.get("architectures") or []
    if not architectures:
        raise PipelineError(f"{folder / 'config.json'}: no 'architectures' entry to name the model class")
    component = folder / TOKENIZER_COMPONENT_DIR
    component.mkdir(parents=True, exist_ok=True)
    for name in tokenizer_files:
        shutil.copyfile(folder / name, component / name)
    dtype = config.get("dtype") or config.get("torch_dtype")
    model = Model()
    model.add_flavor(
        "transformers", transformers_version=metadata.version("transformers"), code=None,
        task=TASK, instance_type="TextGenerationPipeline", pipeline_model_type=architectures[0],
        source_model_name=source_model, model_binary=".", components=["tokenizer"],
        tokenizer_type="AutoTokenizer", torch_dtype=_TORCH_DTYPES.get(str(dtype)),
    )
    add_to_model(model, loader_module="mlflow.transformers", conda_env="conda.yaml", python_env="python_env.yaml")
    model.signature = ModelSignature(inputs=Schema([ColSpec("string")]), outputs=Schema([ColSpec("string")]),
                                     params=ParamSchema([ParamSpec(n, t, d) for n, t, d in GENERATION_PARAMS]))
    _write_environment(folder)
    model.model_size_bytes = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    path = folder / MLMODEL_FILE
    model.save(str(path))
    return path
