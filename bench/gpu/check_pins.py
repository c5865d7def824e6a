"""Exit non-zero, naming the package, if an installed version differs from a `name==version` pin of the given
requirements file: `python3 bench/gpu/check_pins.py bench/gpu/host-requirements.txt`."""

import importlib.metadata
import sys
from pathlib import Path


def mismatches(path: Path) -> list[str]:
    """One line per pin of `path` whose package is missing or at another version."""
    found = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        spec = line.split("#", 1)[0].strip()
        if not spec:
            continue
        name, sep, pinned = spec.partition("==")
        if not sep:
            raise SystemExit(f"{path}:{number}: not a name==version pin: {spec!r}")
        name, pinned = name.strip(), pinned.strip()
        try:
            have = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            have = None
        if have != pinned:
            found.append(f"{path}:{number}: pins {name}=={pinned}, this host has "
                         + (have or "none") + "; pack the staged wheels with this file (-r)")
    return found


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: check_pins.py REQUIREMENTS", file=sys.stderr)
        return 2
    lines = mismatches(Path(argv[0]))
    for line in lines:
        print(line, file=sys.stderr)
    return 1 if lines else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
