"""Retrain on a schedule: submit a fine-tuning job when the data changed, promote it if it beats the champion.

    python jobs/retrain.py --config my.yaml --address http://head:8265              # one tick (cron, CronJob)
    python jobs/retrain.py --config my.yaml --address http://head:8265 --every 24h   # keep ticking
    python jobs/retrain.py --config my.yaml --cron "0 3 * * *" --metric finetuned/perplexity

The job is `jobs/finetune.py` with `run.name=<run.name>-<fingerprint>`, this checkout as its working
dir. The address defaults to $RAY_ADDRESS; $RAY_AUTH_TOKEN is sent where set. One tick exits 0 when it
succeeded, else 1 with a one-line reason; a --cron / --every loop logs a failed tick and goes on.
"""

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from pipeline.config import load_config
from pipeline.errors import PipelineError
from pipeline.ops.retrain import Gate, Retrainer
from pipeline.ops.cron import Cron, parse_interval, run_schedule
from pipeline.tracking import code_version, code_version_env


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="preset for the job (a path inside this checkout, or a configs/ name)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for the job")
    parser.add_argument("--address", default=os.environ.get("RAY_ADDRESS"), help="Ray dashboard, http://head:8265")
    when = parser.add_mutually_exclusive_group()
    when.add_argument("--cron", help="five-field cron expression, UTC, e.g. '0 3 * * *'")
    when.add_argument("--every", help="interval between ticks: 30m, 6h, 1d; default: one tick")
    parser.add_argument("--metric", default="finetuned/val_loss", help="eval metric the gate compares")
    parser.add_argument("--higher-is-better", action="store_true", help="the metric improves upward")
    parser.add_argument("--alias", default="champion", help="registry alias of the best version")
    parser.add_argument("--timeout", default="24h", help="longest wait for one job (then the next tick waits)")
    parser.add_argument("--poll", default="30s", help="how often to ask Ray about the job")
    return parser.parse_args(argv)


def make_retrainer(args) -> Retrainer:
    from ray.job_submission import JobSubmissionClient

    cfg = load_config(args.config, args.set)
    if args.config and Path(args.config).exists() and REPO not in Path(args.config).resolve().parents:
        raise PipelineError(f"--config {args.config}: the job runs in an upload of {REPO}; "
                            "put the preset inside it (e.g. configs/) and pass its relative path")
    runtime_env = {"working_dir": str(REPO), "env_vars": code_version_env(code_version(REPO))}
    return Retrainer(
        cfg, JobSubmissionClient(args.address), Gate(args.metric, args.higher_is_better, args.alias),
        config_path=args.config, overrides=args.set, runtime_env=runtime_env,
        poll_s=parse_interval(args.poll, "--poll"), timeout_s=parse_interval(args.timeout, "--timeout"),
    )


STOPPED = ("retrain: stopped by Ctrl-C; a job it submitted runs on, and the next tick (this command again) "
           "waits for it instead of submitting another")


def main(argv=None) -> int:
    try:
        return schedule(parse_args(argv))
    except KeyboardInterrupt:  # all state is in MLflow and Ray: nothing to save, only say so
        print(STOPPED, file=sys.stderr)
        return 130


def schedule(args) -> int:
    try:
        cron = Cron.parse(args.cron) if args.cron else None
        every = parse_interval(args.every) if args.every else None
        retrainer = make_retrainer(args)
        if cron is None and every is None:
            retrainer.tick()
            return 0
    except (PipelineError, RuntimeError, ConnectionError) as exc:
        print(f"retrain: error: {exc}", file=sys.stderr)
        return 1

    def tick():
        try:
            retrainer.tick()
        except (PipelineError, RuntimeError, ConnectionError) as exc:
            print(f"retrain: tick failed: {exc}", file=sys.stderr, flush=True)

    run_schedule(tick, cron=cron, every_s=every)
    return 0


if __name__ == "__main__":
    sys.exit(main())
