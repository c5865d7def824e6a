"""The project's Python sources compile without warnings: an invalid escape such as "\\S" in a plain string is
a SyntaxWarning printed on every fresh import today (the GPU host's Python 3.12 shows it) and an error in a
later Python."""

from __future__ import annotations

import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("te_model", "pipeline", "jobs", "bench", "tests")


def test_every_source_compiles_without_a_warning():
    sources = [p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))]
    assert len(sources) > 50
    warned = []
    for path in sources:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            compile(path.read_text(), str(path), "exec")
        warned += [f"{path.relative_to(ROOT)}:{w.lineno}: {w.message}" for w in caught]
    assert not warned, "\n".join(warned)
