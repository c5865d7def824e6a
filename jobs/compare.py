"""Compare fine-tuning jobs in MLflow: the settings that differ, training and evaluation results.

    python jobs/compare.py                                   # newest jobs of the demo experiment
    python jobs/compare.py --config my.yaml --last 5         # experiment and tracking uri from a preset
    python jobs/compare.py --experiment llama3.2-3b-fp8 --tracking-uri http://mlflow:5000 --jobs run-a run-b
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.compare import format_table, load_jobs  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.errors import PipelineError  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="preset whose tracking.uri and experiment to use")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--experiment", help="MLflow experiment (default: the config's)")
    parser.add_argument("--tracking-uri", help="MLflow tracking uri (default: the config's)")
    parser.add_argument("--jobs", nargs="+", help="job (parent run) names to compare")
    parser.add_argument("--last", type=int, default=10, help="how many of the newest jobs (default 10)")
    parser.add_argument("--sort-by", default="finetuned/val_loss")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        jobs = load_jobs(args.experiment or cfg.tracking.experiment, args.tracking_uri or cfg.tracking.uri,
                         names=args.jobs, last=args.last)
    except PipelineError as exc:
        print(f"compare: error: {exc}", file=sys.stderr)
        return 1
    if not jobs:
        print("no jobs found")
        return 0
    print(format_table(jobs, sort_by=args.sort_by))
    return 0


if __name__ == "__main__":
    sys.exit(main())
