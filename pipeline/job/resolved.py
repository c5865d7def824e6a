"""The job's settings resolved once, at job start: one frozen `ResolvedJob` that every stage reads.

A config names relative paths, a tracking uri and storage settings. Turning them into absolute paths,
storage options and a tracking location happens here and nowhere else. The driver, the stages and the
Ray train workers take what they need from the one object; Ray hands it to the workers as it is.
The FP8 decision is part of it: training runs with `train_config`, checked before the job opens.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from pathlib import Path

from pipeline import storage
from pipeline.config import Config, TrainConfig
from pipeline.errors import PermanentError
from pipeline.job.locations import lasting_locations

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Fp8Decision:
    """FP8 as asked for and as training runs it."""

    requested: str
    """`train.fp8` as configured ("none": not asked for)."""

    attention_requested: bool
    """`train.fp8_attention` as configured."""

    recipe: str
    """The recipe training runs with; "none" after a fallback."""

    attention: bool
    """Whether training runs attention in FP8."""

    fallback: str | None = None
    """Why training runs with less FP8 than asked (the `fp8.fallback` tag); None when it runs as asked."""

    checked: bool = False
    """Whether a training worker was asked if FP8 runs there; False when no train stage needed it."""

    @classmethod
    def as_requested(cls, train: TrainConfig, checked: bool = False) -> Fp8Decision:
        return cls(train.fp8, train.fp8_attention, train.fp8, train.fp8_attention, None, checked)

    def apply(self, cfg: Config) -> Config:
        """`cfg` with this decision's FP8 settings; `cfg` itself when they are its own."""
        if (cfg.train.fp8, cfg.train.fp8_attention) == (self.recipe, self.attention):
            return cfg
        # without FP8 there is no FP8 head, FP8 GEMM or FP8 weight to ask for: a fallback turns them off with the rest
        fp8 = self.recipe != "none"
        train = dataclasses.replace(cfg.train, fp8=self.recipe, fp8_attention=self.attention,
                                    fp8_head=cfg.train.fp8_head if fp8 else None,
                                    fp8_fast_accumulation=cfg.train.fp8_fast_accumulation if fp8 else None,
                                    recast_fp8_weights=cfg.train.recast_fp8_weights and fp8,
                                    fp8_weights_from_update=cfg.train.fp8_weights_from_update and fp8)
        return dataclasses.replace(cfg, train=train)


def fp8_head_on(train: TrainConfig, hidden_size: int, vocab_size: int, say_why: bool = False) -> bool:
    """Whether training runs the LM head's GEMMs in FP8 (`train.fp8_head`): with FP8 training, unless turned
    off or, when left to the default, unless the head's sizes do not fit FP8 GEMMs (then, with `say_why`, it
    logs why: job start does, once; the run's tags and the workers only ask).
    Asked for explicitly where they do not fit: a PermanentError naming the key (job start checks it first,
    `preflight.check_base_checkpoint`)."""
    from te_model.fp8_head import unfit_reason

    if train.fp8 == "none" or train.fp8_head is False:
        return False
    reason = unfit_reason(hidden_size, vocab_size)
    if reason and train.fp8_head:
        raise PermanentError(f"train.fp8_head=true cannot run on this model: {reason}; set it to null (FP8 where "
                             "the head fits) or false")
    if reason and say_why:
        log.info("the LM head stays bf16 (train.fp8_head left null): %s", reason)
    return reason is None


@dataclasses.dataclass(frozen=True)
class TrackingTarget:
    """Where the job's MLflow runs go."""

    uri: str
    """The resolved tracking uri: a server as given, a local store as an absolute uri."""

    experiment: str
    """The MLflow experiment of the job's runs (`tracking.experiment`)."""


@dataclasses.dataclass(frozen=True)
class RunFolders:
    """Where the job writes, all absolute (or remote)."""

    output_uri: str
    """`run.output_uri`: data, checkpoints, exports and the job's state file live under it."""

    cache_dir: str
    """`run.cache_dir`: this node's cache of pulled checkpoints and conversions."""

    state_uri: str
    """The job's state file, `{output_uri}/jobs/{run.name}/state.json` (`pipeline.job.state`)."""

    ray_uri: str
    """Ray Train's storage, `{output_uri}/ray`; a training run's folder is `{ray_uri}/{run.name}`."""

    moved: tuple[str, ...] = ()
    """Each relative output moved out of Ray's temporary working directory (`run.output_uri: a -> b`)."""


@dataclasses.dataclass(frozen=True)
class ResolvedJob:
    """Everything a job's stages and workers read, resolved once (`resolve_job`)."""

    config: Config
    """The validated config with lasting, absolute local paths (`run.output_uri`, `run.cache_dir`,
    `model.base_uri`); FP8 as requested."""

    given: Config
    """The config as loaded (lasting locations applied, paths as written): what MLflow params and the job's
    identity record, so a resumed job compares equal to its earlier runs."""

    storage: storage.StorageOptions
    """The storage options of `storage.*`, built once."""

    tracking: TrackingTarget
    folders: RunFolders
    fp8: Fp8Decision

    @property
    def train_config(self) -> Config:
        """The config training runs with: `config` with the FP8 decision applied."""
        return self.fp8.apply(self.config)

    @property
    def tracking_uri(self) -> str:
        return self.tracking.uri

    def with_fp8(self, decision: Fp8Decision) -> ResolvedJob:
        """This job with FP8 checked on a worker (`pipeline.job.precision.decide_fp8`), before the job opens."""
        return dataclasses.replace(self, fp8=decision)


def resolve_job(cfg: Config, environ: Mapping[str, str] | None = None, cwd: Path | None = None) -> ResolvedJob:
    """The job of `cfg` resolved: lasting locations, absolute paths, storage options, tracking location.

    Writes nothing: a local tracking store's folder is made when the job opens (`tracking.make_local_store`).
    """
    # imports mlflow: resolving happens on the driver only
    from pipeline import tracking

    given, moved = lasting_locations(cfg, environ, cwd)
    config = dataclasses.replace(
        given,
        run=dataclasses.replace(given.run, output_uri=absolute_path(given.run.output_uri),
                                cache_dir=absolute_path(given.run.cache_dir)),
        model=dataclasses.replace(given.model, base_uri=absolute_path(given.model.base_uri)),
    )
    output = config.run.output_uri
    folders = RunFolders(output, config.run.cache_dir, storage.join(output, "jobs", config.run.name, "state.json"),
                         storage.join(output, "ray"), tuple(moved))
    target = TrackingTarget(tracking.resolve_tracking_uri(config.tracking.uri, create=False),
                            config.tracking.experiment)
    return ResolvedJob(config, given, storage_options(config), target, folders,
                       Fp8Decision.as_requested(config.train))


def storage_options(cfg: Config) -> storage.StorageOptions:
    """The storage options of `cfg`: the one place they are made. Stage functions called outside a job
    (tests, a notebook) come here when they are given none."""
    return storage.StorageOptions.from_config(cfg.storage)


def absolute_path(uri: str | None) -> str | None:
    """A local path (or file:// uri) made absolute against this process's directory; remote uris (and
    None) as given. Ray workers run in a directory of their own: every process must get the same path."""
    if uri is None:
        return None
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    elif "://" in uri:
        return uri
    return os.path.abspath(os.path.expanduser(uri))
