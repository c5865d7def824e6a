"""Compare fine-tuning jobs in MLflow: differing settings, final metrics, throughput and loss curves.

    python jobs/compare.py --experiment llama3.2-3b-fp8                 # the newest 10 jobs
    python jobs/compare.py --experiment llama3.2-3b-fp8 job-fp8 job-bf16  # jobs by name
    python jobs/compare.py 3f2a9c... 81be04...                          # jobs by parent run id
    python jobs/compare.py --config my.yaml --last 5                    # experiment and uri of a preset
    python jobs/compare.py --config my.yaml run-a run-b                 # jobs by name in the preset's experiment

Prints the table and writes loss_curves.png (--out); the table and the PNG are also logged to a new
run tagged pipeline.role=comparison in the first job's experiment (--no-log to skip).
"""

import argparse
import sys
from pathlib import Path


from pipeline.tracking.compare import format_table, load_jobs, log_comparison, plot_losses
from pipeline.config import load_config
from pipeline.errors import PipelineError


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", metavar="RUN",
                        help="job names (in --experiment, else the config's experiment) or parent run ids")
    parser.add_argument("--experiment", help="MLflow experiment (default: the config's)")
    parser.add_argument("--tracking-uri", help="MLflow tracking uri (default: the config's)")
    parser.add_argument("--config", help="preset whose tracking.uri and experiment to use")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--last", type=int, default=10, help="how many of the newest jobs (default 10)")
    parser.add_argument("--sort-by", default="finetuned/val_loss", help="metric to order rows by, lowest first")
    parser.add_argument("--out", default=".", help="folder for loss_curves.png (default: here)")
    parser.add_argument("--no-log", action="store_true", help="do not log the comparison to MLflow")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        experiment = args.experiment or (None if args.runs else cfg.tracking.experiment)
        uri = args.tracking_uri or cfg.tracking.uri
        jobs = load_jobs(uri, args.runs, experiment, last=args.last, names_in=cfg.tracking.experiment)
        if not jobs:
            print(f"no jobs in experiment {experiment!r}")
            return 0
        table = format_table(jobs, sort_by=args.sort_by)
        png = Path(args.out) / "loss_curves.png"
        png.parent.mkdir(parents=True, exist_ok=True)
        plot_losses(jobs, png)
        print(table)
        print(f"loss curves: {png}")
        if not args.no_log:
            print(f"logged as MLflow run {log_comparison(uri, jobs, table, png)} (pipeline.role=comparison)")
    except PipelineError as exc:
        print(f"compare: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
