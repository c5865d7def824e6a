"""Fine-tune a Llama checkpoint: data-prep → train → eval → export, on a Ray cluster.

    python jobs/finetune.py                                  # the tiny CPU demo, end to end
    python jobs/finetune.py --config my.yaml --set train.lr=2e-5 --stages eval,export
    python jobs/finetune.py --config my.yaml --dry-run       # check config, data, storage, tracking
    python jobs/finetune.py --list-keys                      # every key; --print-config: the resolved config
    ray job submit --working-dir . -- python jobs/finetune.py --config my.yaml

Exits 0 on success, else 1 with one line: what is wrong, where (key, file, row or tensor) and the fix.
--debug (alias --traceback) adds the full traceback.
"""

import argparse
import os
import sys
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# pipeline.job.driver (Ray, MLflow, torch: seconds to import) is imported once the config is valid, so a
# typo in the config fails at once.
from pipeline.config import STAGES, describe_keys, load_config
from pipeline.job.locations import BASE_DIR_ENV, lasting_locations
from pipeline.errors import Interrupted, PipelineError


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML preset (a path, or a name in configs/); default: the tiny demo")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.lr=2e-5")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    parser.add_argument("--dry-run", action="store_true", help="check everything, train nothing")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (preset, overrides, environment) as YAML and exit")
    parser.add_argument("--list-keys", action="store_true",
                        help="list every config key with its type, default and documentation, and exit")
    parser.add_argument("--debug", "--traceback", dest="debug", action="store_true",
                        help="on failure, print the full traceback before the one-line reason")
    args = parser.parse_args(argv)
    args.stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in args.stages if s not in STAGES]
    if unknown:
        parser.error(f"--stages: unknown stage {unknown[0]!r} (choose from {', '.join(STAGES)})")
    return args


def worker_pythonpath() -> str:
    """PYTHONPATH for Ray's workers: the checkout first, then the driver's own entries.

    Workers find the project through it, also on a cluster joined by RAY_ADDRESS from this node; under
    `ray job submit` (which hands the driver its job config) the working dir does it instead. A runtime
    env's PYTHONPATH replaces the inherited one, so packages the driver reaches through PYTHONPATH (a
    site folder beside the system's) are kept.
    """
    inherited = os.environ.get("PYTHONPATH")
    return str(REPO) + (os.pathsep + inherited if inherited else "")


def start_ray():
    import ray

    if ray.is_initialized():
        return
    env = None if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") else {"env_vars": {"PYTHONPATH": worker_pythonpath()}}
    # the dashboard also serves Ray's state API, which Ray Train polls; without it Train logs warnings
    ray.init(address=os.environ.get("RAY_ADDRESS"), runtime_env=env)


def report_dry_run(job) -> int:
    from pipeline.job.driver import dry_run

    checks = dry_run(job)
    for name, ok, detail in checks:
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}")
    return 0 if all(ok for _, ok, _ in checks) else 1


def fail(exc: BaseException, debug: bool) -> int:
    """Report a failure as one redacted line on stderr (after the traceback with --debug)."""
    from pipeline.storage.redact import error_line, redact_text

    if debug:
        traceback.print_exception(exc)
    if isinstance(exc, PipelineError):  # bad input, or a stage's JobError
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        message = redact_text(" ".join(line.strip() for line in lines))
    else:  # not a known bad input: a bug or an environment problem, still one line
        message = f"unexpected {error_line(exc)} (run with --debug for the full traceback)"
    print(f"finetune: error: {message}", file=sys.stderr)
    return 1


def stopped(exc: KeyboardInterrupt, debug: bool) -> int:
    """Report a stop as one line on stderr: which signal, in which stage, and how to go on."""
    if debug:
        traceback.print_exception(exc)
    stop = exc if isinstance(exc, Interrupted) else Interrupted("Ctrl-C")  # before the job's stages began
    where = f" during {stop.stage}" if stop.stage else ""
    print(f"finetune: stopped by {stop.signal}{where}; the same command resumes the job (training from its "
          "newest committed checkpoint)", file=sys.stderr)
    return stop.exit_code


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.list_keys:
            print(describe_keys())
            return 0
        cfg = load_config(args.config, args.set)
        if args.print_config:
            print(lasting_locations(cfg)[0].to_yaml(), end="")
            return 0
        from pipeline.job.resolved import resolve_job

        job = resolve_job(cfg)  # the one place the config is resolved: every stage and worker gets `job`
        for line in job.folders.moved:  # under `ray job submit`: out of Ray's temporary working directory
            print(f"[job] {line} (relative outputs go under ${BASE_DIR_ENV} or ~/finetune in a Ray job)")
        if args.dry_run:
            return report_dry_run(job)
        from pipeline.job.driver import run_job
        from pipeline.tracking import code_version

        ctx = run_job(job, args.stages, code_version(REPO), connect=start_ray)
    except Exception as exc:  # noqa: BLE001 - every failure ends as one line and exit code 1
        return fail(exc, args.debug)
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (`ray job stop`) once the job has begun
        return stopped(exc, args.debug)
    from pipeline.progress import write_line
    from pipeline.storage.redact import redact_text

    tracking_uri = redact_text(ctx.tracking_uri)
    # Ray is still connected: its log thread may yet print workers' lines, so each line goes out in one write.
    write_line(f"done: job {cfg.run.name!r}, MLflow parent run {ctx.state.parent_run_id} at {tracking_uri}")
    if ctx.tracking_uri.startswith("sqlite:"):
        write_line(f"open it with: mlflow ui --backend-store-uri {tracking_uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
