"""Distillation losses against hand-computed values, their zero points, the loss factory and the
``distill`` stage (student predictions move toward the teacher's)."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import slimline
from slimline.data import load_dataset
from slimline.distillation import (
    dist_loss,
    distillation_loss_fn,
    hinton_kd_loss,
    kd_soft_loss,
    pearson_correlation,
    sinkhorn_kd_loss,
    sinkhorn_plan,
)
from slimline.models import build_model
from slimline.recipe import RecipeError
from slimline.search.distill import DistillLossConfig, hint_loss, make_distill_loss
from slimline.stage import StageFailed
from slimline.training import TrainParams, fit


def logits_of(probabilities: list[list[float]]) -> torch.Tensor:
    """Logits whose softmax (T = 1) is exactly ``probabilities``."""
    return torch.tensor(probabilities, dtype=torch.float64).log()


# ---- Hinton KD -------------------------------------------------------------------------------
def test_hinton_kd_matches_hand_value() -> None:
    student, teacher = logits_of([[0.5, 0.5]]), logits_of([[0.75, 0.25]])
    labels = torch.tensor([0])
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert float(kd_soft_loss(student, teacher, temperature=1.0)) == pytest.approx(kl)
    mixed = hinton_kd_loss(student, teacher, labels, temperature=1.0, alpha=0.25)
    assert float(mixed) == pytest.approx(0.25 * kl + 0.75 * math.log(2))
    # T^2 scaling: at T = 2 the soft targets are softmax(z / 2), and the KL is multiplied by 4
    p = torch.softmax(teacher[0] / 2, 0)
    kl2 = float((p * (p / 0.5).log()).sum())
    assert float(kd_soft_loss(student, teacher, temperature=2.0)) == pytest.approx(4 * kl2)
    assert float(kd_soft_loss(teacher, teacher)) == pytest.approx(0.0, abs=1e-12)


# ---- DIST ------------------------------------------------------------------------------------
def test_pearson_correlation_hand_value() -> None:
    # centred x30: (-4, -1, 5) and (5, -1, -4): rho = -39 / 42
    a = torch.tensor([[0.2, 0.3, 0.5]], dtype=torch.float64)
    b = torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64)
    assert float(pearson_correlation(a, b)) == pytest.approx(-39 / 42)
    assert float(pearson_correlation(a, 3 * a + 1)) == pytest.approx(1.0)


def test_dist_loss_hand_values_and_zero_points() -> None:
    student = logits_of([[0.25, 0.75], [0.75, 0.25]])
    teacher = logits_of([[0.75, 0.25], [0.25, 0.75]])
    # two classes: every row and column pair is perfectly anti-correlated, d_p = 1 - (-1) = 2
    assert float(dist_loss(student, teacher, temperature=1.0)) == pytest.approx(4.0)
    assert float(dist_loss(student, teacher, temperature=1.0, gamma=0.0)) == pytest.approx(2.0)
    assert float(dist_loss(student, teacher, temperature=2.0, beta=0.5, gamma=0.0)) == (
        pytest.approx(4 * 0.5 * 2.0))
    assert float(dist_loss(teacher, teacher, temperature=1.0)) == pytest.approx(0.0, abs=1e-6)
    # only rankings count: any student that orders classes and samples like the teacher scores 0
    agreeing = logits_of([[0.4, 0.6], [0.6, 0.4]])
    assert float(dist_loss(agreeing, student, temperature=1.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(kd_soft_loss(agreeing, student, temperature=1.0)) > 0.04  # KL is not zero


# ---- Sinkhorn --------------------------------------------------------------------------------
def test_sinkhorn_plan_marginals_and_two_point_closed_form() -> None:
    cost = torch.tensor([[0.1, 0.7], [0.4, 0.2]], dtype=torch.float64)
    epsilon = 0.3
    plan = sinkhorn_plan(cost, epsilon=epsilon, iterations=200)
    assert torch.allclose(plan.sum(1), torch.full((2,), 0.5, dtype=torch.float64))
    assert torch.allclose(plan.sum(0), torch.full((2,), 0.5, dtype=torch.float64))
    # 2x2, uniform marginals: P = [[a, 1/2 - a], [1/2 - a, a]] and the Gibbs form P = u K v gives
    # a^2 / (1/2 - a)^2 = exp(-(D11 + D22 - D12 - D21) / eps)
    root = math.sqrt(math.exp(-(0.1 + 0.2 - 0.7 - 0.4) / epsilon))
    a = root / (2 * (1 + root))
    assert float(plan[0, 0]) == pytest.approx(a) and float(plan[0, 1]) == pytest.approx(0.5 - a)


def test_sinkhorn_kd_loss_hand_value_and_limit() -> None:
    probabilities = [[0.8, 0.2], [0.3, 0.7]]
    same = logits_of(probabilities)
    # D = [[0, d], [d, 0]] with d = |0.8 - 0.3| + |0.2 - 0.7| = 1: a = 1 / (2 (1 + e^{-d/eps}))
    # and <P, D> = 2 (1/2 - a) d = d / (1 + e^{d / eps})
    for epsilon in (0.5, 0.2):
        value = sinkhorn_kd_loss(same, same, temperature=1.0, epsilon=epsilon, iterations=100)
        assert float(value) == pytest.approx(1.0 / (1 + math.exp(1.0 / epsilon)))
    tiny = sinkhorn_kd_loss(same, same, temperature=1.0, epsilon=0.02, iterations=50)
    assert float(tiny) < 1e-9  # tends to 0 as eps -> 0 for distinct samples
    swapped = logits_of([[0.3, 0.7], [0.8, 0.2]])
    # the batch-wise distance compares the sets of predictions, so a permuted batch is as close
    assert float(sinkhorn_kd_loss(swapped, same, temperature=1.0, epsilon=0.02)) < 1e-9
    moved = logits_of([[0.6, 0.4], [0.3, 0.7]])
    assert float(sinkhorn_kd_loss(moved, same, temperature=1.0, epsilon=0.02)) == pytest.approx(
        0.5 * 0.4, rel=1e-3)  # half the mass moves L1 distance 0.4 (up to the entropy term)


# ---- hint (FitNets) --------------------------------------------------------------------------
def test_hint_loss_hand_value() -> None:
    target = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    regressed = torch.tensor([[1.0, 4.0], [1.0, -1.0]])
    assert float(hint_loss(regressed, target)) == pytest.approx(0.5 * (4 + 1) / 4)
    with pytest.raises(ValueError, match=r"\(2, 3\)"):
        hint_loss(torch.zeros(2, 3), target)


def _resnet(width: int) -> nn.Module:
    torch.manual_seed(0)
    return build_model("resnet", num_classes=10, in_channels=1, input_size=(8, 8), width=width)


def test_hint_regressor_shapes_and_mismatch_names_the_layers() -> None:
    student, teacher, x = _resnet(4), _resnet(8), torch.randn(4, 1, 8, 8)
    config = DistillLossConfig("hint", student_layer="layer3", teacher_layer="layer3")
    loss = make_distill_loss(config, teacher, student, x)
    regressor = loss.adapters["regressor"]
    assert isinstance(regressor, nn.Conv2d) and regressor.kernel_size == (1, 1)
    assert (regressor.in_channels, regressor.out_channels) == (16, 32)
    assert loss.trainee is not student and any(
        p is regressor.weight for p in loss.trainee.parameters())
    vectors = make_distill_loss(DistillLossConfig("hint"), teacher, student, x)
    assert isinstance(vectors.adapters["regressor"], nn.Linear)  # classifier inputs: (B, C)
    bad = DistillLossConfig("hint", student_layer="layer1", teacher_layer="layer3")
    with pytest.raises(ValueError, match="'layer1'.*'layer3'.*spatial"):
        make_distill_loss(bad, teacher, student, x)
    with pytest.raises(ValueError, match="student has no layer 'layer4'.*layer3"):
        loss = make_distill_loss(DistillLossConfig("hint", student_layer="layer4"), teacher, student, x)
        loss(student, x, torch.zeros(4, dtype=torch.long))


# ---- the factory: zero points and no hooks left ----------------------------------------------
def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("name", ["kd", "dist", "diswot"])
def test_distillation_terms_vanish_when_student_is_the_teacher(name: str) -> None:
    teacher = _resnet(4).eval()
    student = copy.deepcopy(teacher).eval()
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    loss = make_distill_loss(DistillLossConfig(name), teacher, student, x)
    terms = loss.terms(student, x, y)
    for term, value in terms.items():
        if term != "ce":
            assert float(value.detach()) == pytest.approx(0.0, abs=1e-6), term
    assert float(loss.combine(terms).detach()) == pytest.approx(float(terms["ce"].detach()),
                                                              abs=1e-5)
    assert _hook_count(student) == 0 and _hook_count(teacher) == 0


def test_diswot_loss_is_differentiable_and_weighted() -> None:
    teacher, student = _resnet(8).eval(), _resnet(4)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    config = DistillLossConfig("diswot", ce_weight=0.0, relation_weight=2.0, semantic_weight=3.0)
    loss = make_distill_loss(config, teacher, student, x)
    terms = loss.terms(student, x, y)
    values = {name: float(value.detach()) for name, value in terms.items()}
    assert values["relation"] > 0 and values["semantic"] > 0
    total = loss.combine(terms)
    assert float(total.detach()) == pytest.approx(2 * values["relation"] + 3 * values["semantic"])
    total.backward()
    assert student.conv1.weight.grad is not None and student.conv1.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


@pytest.mark.parametrize("name", ["kd", "dist", "sinkhorn"])
def test_training_stage_loss_is_alpha_mix_of_term_and_ce(name: str) -> None:
    """What prune.pdp / quant.qat plug into fit: alpha * term + (1 - alpha) * CE."""
    teacher, student = _resnet(8).eval(), _resnet(4).eval()
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    loss_fn = distillation_loss_fn(teacher, temperature=2.0, alpha=0.3, loss=name)
    z_s, z_t = student(x), teacher(x)
    term = {"kd": kd_soft_loss(z_s, z_t, temperature=2.0),
            "dist": dist_loss(z_s, z_t, temperature=2.0),
            "sinkhorn": sinkhorn_kd_loss(z_s, z_t, temperature=2.0, epsilon=0.1)}[name]
    expected = 0.3 * term + 0.7 * F.cross_entropy(z_s, y)
    assert float(loss_fn(student, x, y).detach()) == pytest.approx(float(expected.detach()),
                                                               rel=1e-5)


def test_training_stages_only_take_logit_losses() -> None:
    with pytest.raises(ValueError, match="feature losses need the 'distill' stage"):
        distillation_loss_fn(_resnet(4), temperature=4.0, alpha=0.5, loss="hint")
    with pytest.raises(ValueError, match="did you mean 'dist'"):
        DistillLossConfig("dst")  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["kd", "dist", "sinkhorn"])
def test_distilling_moves_student_predictions_toward_teacher(name: str) -> None:
    """Labels off (ce_weight 0), a random teacher: only the teacher signal trains the student.
    Its predictions must move toward the teacher's: top-1 agreement rises and, for the losses
    that match distributions (KD, Sinkhorn), the mean KL from the teacher falls. DIST matches
    rankings (Pearson correlation), not probabilities, so for it the correlation must rise."""
    data = load_dataset("digits")
    torch.manual_seed(1)
    teacher = build_model("mlp", hidden=[16]).eval()
    torch.manual_seed(2)
    student = build_model("mlp", hidden=[16])

    def closeness() -> tuple[float, float, float]:
        with torch.no_grad():
            z_s, z_t = student(data.x_val), teacher(data.x_val)
        kl = F.kl_div(F.log_softmax(z_s, 1), F.log_softmax(z_t, 1), reduction="batchmean",
                      log_target=True)
        agreement = (z_s.argmax(1) == z_t.argmax(1)).float().mean()
        rho = pearson_correlation(z_s.softmax(1), z_t.softmax(1)).mean()
        return float(kl), float(agreement), float(rho)

    kl_before, agreement_before, rho_before = closeness()
    config = DistillLossConfig(name, ce_weight=0.0, temperature=1.0)  # type: ignore[arg-type]
    fit(student, data, TrainParams(epochs=3, lr=1e-2), loss_fn=make_distill_loss(
        config, teacher, student))
    kl, agreement, rho = closeness()
    # measured (seeds fixed): agreement 0.06 -> 0.56 / 0.62 / 0.36 (kd / dist / sinkhorn),
    # rho -0.15 -> 0.90 / 0.92 / 0.76, KL 0.059 -> 0.006 / 0.24 / 0.013
    assert agreement > agreement_before + 0.25
    assert rho > rho_before + 0.6
    if name != "dist":
        assert kl < 0.5 * kl_before


# ---- the stage in a recipe -------------------------------------------------------------------
def test_distill_stage_moves_student_to_teacher_and_drops_the_regressor(
        tmp_path: Path, tiny_recipe) -> None:
    tiny_recipe["model"] = {"name": "resnet", "with": {"width": 4}}
    tiny_recipe["stages"] = [
        {"id": "teacher", "uses": "train", "with": {"epochs": 2}},
        # needs []: the student is the recipe's (untrained) source model, pruned
        {"id": "pruned", "uses": "prune.magnitude", "needs": [], "with": {"sparsity": 0.5}},
        {"id": "kd", "uses": "distill", "needs": ["pruned"],
         "with": {"teacher": "teacher", "epochs": 2}},
        {"id": "hint", "uses": "distill", "needs": ["pruned"],
         "with": {"teacher": "teacher", "loss": "hint", "epochs": 1, "kd_weight": 1.0,
                  "student_layer": "layer2", "teacher_layer": "layer2"}},
    ]
    result = slimline.run(tiny_recipe, run_dir=tmp_path, progress=False)
    kd = result.record("kd").metrics
    assert kd["val_kl_to_teacher"] < 0.5 * kd["val_kl_to_teacher_before"]
    assert [r["epoch"] for r in kd["epochs"]] == [1, 2]
    assert {"ce_term", "kd_term"} <= set(kd["epochs"][-1])
    hint = result.artifact("hint")
    assert {"ce_term", "hint_term", "kd_term"} <= set(hint.metrics["epochs"][0])
    # the artifact holds the plain student: same keys as a fresh build, no regressor
    assert set(hint.model.state_dict()) == set(_resnet(4).state_dict())
    assert hint.model_id == "hint" and hint.metrics["teacher"] == "teacher"
    parameters = dict(hint.model.named_parameters())  # the pruned weights stayed at zero
    assert hint.masks and all((parameters[n][~m] == 0).all() for n, m in hint.masks.items())


def test_distill_stage_errors(tmp_path: Path, tiny_recipe) -> None:
    tiny_recipe["stages"] = [{"id": "d", "uses": "distill", "with": {"epochs": 1}}]
    with pytest.raises(RecipeError, match="teacher"):
        slimline.run(tiny_recipe, run_dir=tmp_path, progress=False)
    tiny_recipe["stages"] = [
        {"id": "t", "uses": "train", "with": {"epochs": 1}},
        {"id": "d", "uses": "distill",
         "with": {"teacher": "t", "loss": "hint", "student_layer": "features.9"}},
    ]
    with pytest.raises(StageFailed, match="student has no layer 'features.9'"):
        slimline.run(tiny_recipe, run_dir=tmp_path / "b", progress=False)


# ---- torch.distributed: the regressor trains in step on every rank --------------------------
def _distill_hint(rank: int = 0) -> dict[str, torch.Tensor]:
    torch.set_num_threads(1)
    data = load_dataset("digits")
    torch.manual_seed(0)  # no BatchNorm: its statistics are per shard, so BN models drift
    teacher = build_model("mlp", hidden=[32]).eval()
    student = build_model("mlp", hidden=[16])
    config = DistillLossConfig("hint", kd_weight=1.0)  # classifier inputs: a linear regressor
    loss = make_distill_loss(config, teacher, student, data.x_train[:8])
    fit(loss.trainee, data, TrainParams(epochs=1, batch_size=50), seed=3, loss_fn=loss)
    return {k: v.detach().clone() for k, v in loss.trainee.state_dict().items()}


def _ddp_worker(rank: int, out: str) -> None:
    torch.save(_distill_hint(rank), f"{out}.{rank}")


@pytest.mark.slow
def test_two_processes_distill_like_one(tmp_path: Path) -> None:
    """Hint + KD are per-sample means, so two shards with summed, size-weighted gradients follow
    the one-process run; the regressor is all-reduced like the student (ranks identical)."""
    from tests.gloo_spawn import spawn_gloo

    out = str(tmp_path / "state")
    spawn_gloo(_ddp_worker, str(tmp_path / "store"), out)
    ranks = [torch.load(f"{out}.{rank}", weights_only=True) for rank in range(2)]
    single = _distill_hint()
    assert any(key.startswith("adapters.regressor") for key in single)
    for key, value in single.items():
        assert torch.equal(ranks[0][key], ranks[1][key]), key  # ranks never drift apart
        close = torch.isclose(value, ranks[0][key], atol=1e-3, rtol=1e-3).float().mean()
        assert close > 0.98, (key, float(close))
