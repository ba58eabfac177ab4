"""The stage registry: recipe ``uses:`` name -> typed params + a function ``Artifact -> Artifact``.

A stage is written as::

    @dataclass
    class MagnitudeParams:
        sparsity: float = param(0.5, help="fraction of weights set to zero")

    @register_stage("prune.magnitude", MagnitudeParams)
    def prune_magnitude(ctx: StageContext, inputs: list[Artifact], p: MagnitudeParams) -> Artifact:
        '''One-line doc shown by `slimline stages`.'''
        ...

Stages never reach into each other; they get artifacts and return one.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from slimline.export.target import Target, resolve_target
from slimline.params import describe_params
from slimline.progress import Progress
from slimline.registry import Registry, first_doc_line

if TYPE_CHECKING:
    from slimline.artifact import Artifact
    from slimline.data import Dataset

log = logging.getLogger("slimline")

StageFunction = Callable[["StageContext", list["Artifact"], Any], "Artifact"]


@dataclass(frozen=True)
class StageDef:
    name: str
    function: StageFunction
    params: type
    # Parameters whose values are stage ids: the runner adds them as dependencies and passes the
    # artifacts in ctx.references.
    stage_refs: tuple[str, ...] = ()
    min_inputs: int = 1
    max_inputs: int = 1
    # Its output depends on the deployment target (int8 grids, export checks): the resolved
    # target joins its cache key and reaches it as ctx.target.
    target_aware: bool = False

    @property
    def doc(self) -> str:
        return first_doc_line(self.function)

    def describe(self) -> list[tuple[str, str, str, str]]:
        return describe_params(self.params)


STAGES: Registry[StageDef] = Registry("stage")


def register_stage(name: str, params: type, *, stage_refs: tuple[str, ...] = (),
                   min_inputs: int = 1, max_inputs: int = 1, target_aware: bool = False
                   ) -> Callable[[StageFunction], StageFunction]:
    def add(function: StageFunction) -> StageFunction:
        STAGES.register(name)(StageDef(name, function, params, stage_refs, min_inputs,
                                       max_inputs, target_aware))
        return function

    return add


def get_stage(name: str) -> StageDef:
    _load_builtin_stages()
    return STAGES.get(name)


def list_stages() -> list[StageDef]:
    _load_builtin_stages()
    return [STAGES.get(name) for name in STAGES.names()]


def _load_builtin_stages() -> None:
    import slimline.stages  # noqa: F401  (registers on import)


class StageFailed(RuntimeError):
    """A stage could not do its work; the message is for the user (no traceback needed)."""


@dataclass
class StageContext:
    """What a stage may use besides its input artifacts."""

    stage_id: str
    uses: str
    seed: int
    work_dir: Path  # write produced files here; it becomes the stage's directory on success
    data_loader: Callable[[], Dataset]
    references: dict[str, Artifact] = field(default_factory=dict)
    # Loads any finished ancestor's output by stage id ("source": the recipe's input model).
    lookup: Callable[[str], Artifact] | None = None
    show_progress: bool = True
    # The stage's content hash (see slimline.dag): names state shared beyond this process,
    # e.g. the Optuna study that `slimline search worker` processes join.
    cache_key: str = ""
    # The CPU the outputs are for (recipe `target:`, resolved; "auto" is this machine).
    target: Target = field(default_factory=lambda: resolve_target("auto"))

    @cached_property
    def data(self) -> Dataset:
        return self.data_loader()

    def progress(self, total: int, desc: str) -> Progress:
        return Progress(total, f"{self.stage_id}: {desc}", enabled=self.show_progress)

    def log(self, message: str) -> None:
        log.info("%s: %s", self.stage_id, message)

    def fail(self, message: str) -> StageFailed:
        return StageFailed(f"stage {self.stage_id!r} ({self.uses}): {message}")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class DataAccessError(StageFailed):
    """A data-free stage tried to read the dataset."""


@contextlib.contextmanager
def no_data(ctx: StageContext) -> Iterator[None]:
    """Within this block ``ctx.data`` raises :class:`DataAccessError` (also when the dataset
    was loaded before: the cached value is hidden and restored afterwards)."""
    loader, cached = ctx.data_loader, ctx.__dict__.pop("data", None)

    def refuse() -> Any:
        raise DataAccessError(
            f"stage {ctx.stage_id!r} ({ctx.uses}) is data-free and may not read the dataset"
        )

    ctx.data_loader = refuse
    try:
        yield
    finally:
        ctx.data_loader = loader
        ctx.__dict__.pop("data", None)
        if cached is not None:
            ctx.__dict__["data"] = cached


def data_free(
    function: Callable[[StageContext, list[Artifact], Any], Artifact],
) -> Callable[[StageContext, list[Artifact], Any], Artifact]:
    """Run a stage function under :func:`no_data` (decorator)."""

    @functools.wraps(function)
    def wrapper(ctx: StageContext, inputs: list[Artifact], p: Any) -> Artifact:
        with no_data(ctx):
            return function(ctx, inputs, p)

    return wrapper
