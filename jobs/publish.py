"""Publish a local checkpoint directory (a base model, an export) to object storage with its manifest.

    python jobs/publish.py LOCAL_DIR s3://bucket/prefix [--endpoint-url URL] [--region REGION]

Credentials come from the standard AWS chain (env vars, ~/.aws, instance role). Failures print one line
to stderr and exit with status 1, without a traceback; Ctrl-C, with 130.
"""

from __future__ import annotations

import argparse
import sys

# Lets the job run from a checkout without installing the package.

from pipeline.errors import PipelineError
from pipeline.storage import StorageOptions, publish


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Publish a checkpoint directory with its manifest.")
    parser.add_argument("local_dir", help="directory holding the checkpoint files")
    parser.add_argument("uri", help="destination: s3://bucket/prefix, file:///path or a local path")
    parser.add_argument("--endpoint-url", help="S3-compatible endpoint (default: AWS_ENDPOINT_URL or AWS)")
    parser.add_argument("--region", help="region used to sign requests")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    options = StorageOptions(endpoint_url=args.endpoint_url, region=args.region)
    try:
        entries = publish(args.local_dir, args.uri, options)
    except PipelineError as exc:
        print(f"publish: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the manifest goes first and comes back last: a cut upload has none
        print(f"publish: stopped by Ctrl-C; {args.uri} has no manifest.json until the same command runs "
              "again to the end", file=sys.stderr)
        return 130
    total = sum(entry.size for entry in entries.values())
    print(f"published {len(entries)} files ({total} bytes) and manifest.json to {args.uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
