"""The job command's own decisions, without starting anything."""

import os

from jobs import finetune


def test_workers_keep_the_drivers_pythonpath_after_the_checkout(monkeypatch):
    """A runtime env's PYTHONPATH replaces what workers inherit: packages the driver imports through
    PYTHONPATH (a site folder beside the system's) must reach the workers too."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(["/opt/site", "/opt/more"]))
    assert finetune.worker_pythonpath().split(os.pathsep) == [str(finetune.REPO), "/opt/site", "/opt/more"]
    monkeypatch.delenv("PYTHONPATH")
    assert finetune.worker_pythonpath() == str(finetune.REPO)
