"""From a parsed recipe to an ordered, validated plan of stages, and their content-hash keys.

A stage's cache key hashes its stage name, its normalised params, the keys of the stages it
reads, the source (model spec, checkpoint bytes, dataset content, seed), slimline's version and,
for stages whose output depends on it, the deployment target:
equal inputs give equal keys, so a finished stage is never recomputed and a changed parameter
recomputes exactly that stage and what depends on it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from slimline.io import canonical_json, sha256_text
from slimline.params import ParamError, parse_params
from slimline.recipe import Recipe, StageSpec
from slimline.registry import UnknownNameError
from slimline.stage import StageDef, get_stage


@dataclass
class PlannedStage:
    spec: StageSpec
    definition: StageDef
    params: Any
    index: int  # position in the recipe
    refs: dict[str, str] = field(default_factory=dict)  # param name -> referenced stage id

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def dependencies(self) -> list[str]:
        return list(dict.fromkeys([*self.spec.needs, *self.refs.values()]))

    def params_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.params)


@dataclass
class Plan:
    recipe: Recipe
    stages: list[PlannedStage]  # topological order, recipe order among independent stages

    def get(self, stage_id: str) -> PlannedStage:
        for stage in self.stages:
            if stage.id == stage_id:
                return stage
        known = ", ".join(s.id for s in self.stages)
        raise KeyError(f"no stage {stage_id!r} in recipe {self.recipe.name!r} (stages: {known})")

    def ancestors(self, stage_id: str) -> set[str]:
        """``stage_id`` and every stage it depends on, directly or not."""
        seen: set[str] = set()
        todo = [stage_id]
        while todo:
            current = todo.pop()
            if current not in seen:
                seen.add(current)
                todo.extend(self.get(current).dependencies)
        return seen

    def descendants(self, stage_id: str) -> set[str]:
        found = {stage_id}
        for stage in self.stages:  # topological order: one pass suffices
            if any(dep in found for dep in stage.dependencies):
                found.add(stage.id)
        return found


def build_plan(recipe: Recipe) -> Plan:
    """Check stage names, params, needs and cycles; return the stages in dependency order."""
    planned: list[PlannedStage] = []
    ids = {stage.id for stage in recipe.stages}
    for index, spec in enumerate(recipe.stages):
        key = f"stages[{index}]"
        try:
            definition = get_stage(spec.uses)
        except UnknownNameError as exc:
            raise recipe.error(str(exc), f"{key}.uses") from None
        try:
            params = parse_params(definition.params, spec.params)
        except ParamError as exc:
            where = f"{key}.with.{exc.key}" if exc.key else f"{key}.with"
            raise recipe.error(exc.message, where) from None
        for need in spec.needs:
            if need not in ids:
                raise recipe.error(f"needs unknown stage {need!r} (stages: {', '.join(sorted(ids))})",
                                   f"{key}.needs")
            if need == spec.id:
                raise recipe.error("a stage cannot need itself", f"{key}.needs")
        refs = {}
        for ref_param in definition.stage_refs:
            target = getattr(params, ref_param)
            if target is None:
                continue
            if target not in ids or target == spec.id:
                raise recipe.error(f"refers to unknown stage {target!r}", f"{key}.with.{ref_param}")
            refs[ref_param] = target
        count = len(spec.needs) if spec.needs else 1  # no needs: the recipe's source model
        if not definition.min_inputs <= count <= definition.max_inputs:
            raise recipe.error(
                f"{spec.uses} takes {definition.min_inputs}..{definition.max_inputs} inputs, "
                f"got {count}", f"{key}.needs")
        planned.append(PlannedStage(spec, definition, params, index, refs))
    return Plan(recipe, _topological(recipe, planned))


def _topological(recipe: Recipe, stages: list[PlannedStage]) -> list[PlannedStage]:
    by_id = {stage.id: stage for stage in stages}
    state: dict[str, str] = {}  # "visiting" | "done"
    order: list[PlannedStage] = []

    def visit(stage: PlannedStage, path: list[str]) -> None:
        if state.get(stage.id) == "done":
            return
        if state.get(stage.id) == "visiting":
            cycle = " -> ".join(path[path.index(stage.id):] + [stage.id])
            raise recipe.error(f"stages form a cycle: {cycle}", f"stages[{stage.index}].needs")
        state[stage.id] = "visiting"
        for dep in stage.dependencies:
            visit(by_id[dep], [*path, stage.id])
        state[stage.id] = "done"
        order.append(stage)

    for stage in stages:
        visit(stage, [])
    return order


def stage_keys(plan: Plan, source_key: str, version: str, target: str = "auto"
               ) -> dict[str, str]:
    """Content-hash key of every stage (see the module docstring). ``target`` (a resolved
    name, not ``auto``) enters the keys of target-aware stages only, so moving a run to a CPU
    of another kind redoes its quantization and export, not its training."""
    keys: dict[str, str] = {}
    for stage in plan.stages:
        inputs = [keys[dep] for dep in stage.spec.needs] or [source_key]
        content = {
            "uses": stage.spec.uses,
            "params": stage.params_dict(),
            "inputs": inputs,
            "refs": {name: keys[ref] for name, ref in stage.refs.items()},
            "slimline": version,
        }
        if stage.definition.target_aware:
            content["target"] = target
        keys[stage.id] = sha256_text(canonical_json(content))
    return keys
