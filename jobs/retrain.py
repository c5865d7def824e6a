"""Retrain on a schedule: a new fine-tuning job whenever the training data changed.

    python jobs/retrain.py --config my.yaml                 # one round (for cron or a scheduler)
    python jobs/retrain.py --config my.yaml --every 24h     # keep running, one round a day
    ray job submit --working-dir . -- python jobs/retrain.py --config my.yaml --every 6h
"""

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jobs.finetune import start_ray  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.driver import JobError  # noqa: E402
from pipeline.errors import PipelineError  # noqa: E402
from pipeline.retrain import parse_interval, retrain_forever, retrain_once  # noqa: E402
from pipeline.tracking import code_version  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--every", help="interval between rounds (30m, 6h, 1d); default: one round")
    parser.add_argument("--force", action="store_true", help="retrain even if the data did not change")
    args = parser.parse_args(argv)
    try:
        every = parse_interval(args.every) if args.every else None
        cfg = load_config(args.config, args.set)
        start_ray()
        if every:
            retrain_forever(cfg, code_version(REPO), every)
        retrain_once(cfg, code_version(REPO), force=args.force)
    except (JobError, PipelineError, ValueError) as exc:
        print(f"retrain: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
