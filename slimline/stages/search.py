"""``search.nas``: training-free, latency-aware search for a student architecture; a thin adapter
over :func:`slimline.search.nas_search.search_architecture` (``slimline.nas`` in Python).

The input artifact is the trained teacher (used by the DisWOT proxies and as the yardstick in
the report). The output is the chosen student, freshly initialised, ready for ``distill`` or
``train``. Strategies: ``nsga2`` (default), ``tpe`` and ``random`` run an Optuna study over the
space (accuracy proxy up, latency down, limits as constraints), which extra processes can join
with ``slimline search worker`` when ``storage`` is a shared URL; ``robot`` combines several
proxies with RoBoT and spends ``query_budget`` short trainings. The stage folder gets
``search.json`` (every evaluated candidate), ``search.md`` and ``pareto.png``.
"""

from __future__ import annotations

from slimline.artifact import Artifact
from slimline.search.nas_config import NasConfig
from slimline.stage import StageContext, register_stage


@register_stage("search.nas", NasConfig)
def search_nas(ctx: StageContext, inputs: list[Artifact], p: NasConfig) -> Artifact:
    from slimline.search.nas_search import SearchFailed, search_architecture

    teacher = inputs[0]
    try:
        result = search_architecture(teacher.model, ctx.data, p, seed=ctx.seed,
                                     work_dir=ctx.work_dir,
                                     study_name=study_name(ctx.stage_id, ctx.cache_key),
                                     worker_id=f"stage-{ctx.stage_id}", log=ctx.log,
                                     progress=ctx.progress)
    except SearchFailed as exc:
        raise ctx.fail(str(exc)) from None
    out = Artifact(model=result.model, model_spec=result.model_spec,
                   input_shape=tuple(teacher.input_shape), metrics=result.metrics,
                   history=list(teacher.history))
    out.files.update(result.files)
    return out


def study_name(stage_id: str, cache_key: str) -> str:
    """Tied to the stage's cache key: changing the recipe starts a new study."""
    return f"slimline-{stage_id}-{cache_key[:12]}" if cache_key else f"slimline-{stage_id}"
