"""A tiny real job for the scheduler's crash tests: it records in MLflow what `jobs/finetune.py` records.

Same command line as `jobs/finetune.py` (`--config`, `--set`), but instead of training it reads its
outcome from the first record of the first training file: `{"text": ..., "val_loss": 2.5}` becomes the
eval metric `finetuned/val_loss`, and `"fail": true` makes the job exit 1. With `eval.champion` set it
"scores" that version on the same rows: the val_loss its own job recorded in its config.json. It creates the parent run and
the eval and export stage runs with the pipeline's own tracking functions, and logs and registers a model
version with the calls `pipeline.stages.export.register_export` makes (without importing torch, which export
does), so the scheduler reads it exactly like a real job. A whole fine-tuning job per tick would make
the crash matrix take minutes; one test runs the real one.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pipeline import storage, tracking  # noqa: E402
from pipeline.config import load_config  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    cfg = load_config(args.config, args.set)
    first = json.loads(storage.read_bytes(cfg.data.train_files[0]).decode().splitlines()[0])
    if first.get("fail"):
        print("failing as the data asks", file=sys.stderr)
        return 1
    uri = tracking.resolve_tracking_uri(cfg.tracking.uri)
    parent = tracking.find_or_start_parent(cfg.tracking.experiment, cfg.run.name, tracking_uri=uri)
    with tracking.stage_run(parent, "eval", tracking_uri=uri) as run_id:
        metrics = {"finetuned/val_loss": first["val_loss"]}
        tags = {"eval.val_uri": cfg.data.train_files[0], "eval.data_hash": "fake"}
        if cfg.eval.champion:
            name, version = cfg.eval.champion.removeprefix("models:/").split("/")
            with tempfile.TemporaryDirectory() as d:
                folder = tracking.download_model_version(name, version, d, tracking_uri=uri)
                metrics["champion/val_loss"] = json.loads((folder / "config.json").read_text())["val_loss"]
            tags["eval.champion"] = cfg.eval.champion
        tracking.log_metrics(run_id, metrics, tracking_uri=uri)
        tracking.set_tags(run_id, tags, tracking_uri=uri)
    with tracking.stage_run(parent, "export", tracking_uri=uri) as run_id, tempfile.TemporaryDirectory() as d:
        config = {"model_type": "llama", "job": cfg.run.name, "val_loss": first["val_loss"]}
        (Path(d) / "config.json").write_text(json.dumps(config))
        tracking.log_model_dir(run_id, d, "model", tracking_uri=uri)
        version = tracking.register_model(run_id, "model", cfg.export.registered_model_name, tracking_uri=uri)
        tracking.set_tags(run_id, {"export.uri": d, "export.registered_version": version}, tracking_uri=uri)
    tracking.end_run(parent, "FINISHED", tracking_uri=uri)
    print(f"job {cfg.run.name}: val_loss {first['val_loss']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
