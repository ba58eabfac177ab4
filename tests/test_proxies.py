"""Zero-cost proxies: each against a value computed by hand or by an independent route on a tiny
net, plus the interface's guarantees (isolation, restored global state, clear errors)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from slimline.models import build_model
from slimline.search.diswot import (
    class_activation_matrix,
    relation_distance,
    sample_relation,
    semantic_distance,
)
from slimline.search.features import tap
from slimline.search.proxies import (
    ProxyError,
    ProxyInputs,
    get_proxy,
    list_proxies,
    score_architecture,
)
from slimline.search.proxies.activation import naswot_kernel_logdet, zen_score
from slimline.search.proxies.base import correlation_eigen_score
from slimline.search.proxies.transformer import (
    attention_projections,
    head_confidence,
    mlp_layers,
)

K = 1e-5


def two_layer(seed: int = 0, d: int = 4, h: int = 3, k: int = 3) -> nn.Sequential:
    """x -> W2 W1 x, no biases: every proxy has a closed form."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, h, bias=False), nn.Linear(h, k, bias=False))


def batch(n: int = 6, d: int = 4, k: int = 3, seed: int = 1) -> ProxyInputs:
    g = torch.Generator().manual_seed(seed)
    return ProxyInputs(torch.randn(n, d, generator=g), torch.arange(n) % k, k)


def closed_form(model: nn.Sequential, inputs: ProxyInputs):
    """Weights, activations and CE gradients of the 2-layer net, by hand in float64 numpy."""
    w1 = model[0].weight.detach().double().numpy()
    w2 = model[1].weight.detach().double().numpy()
    x = inputs.x.double().numpy()
    onehot = np.eye(inputs.num_classes)[inputs.y.numpy()]
    a1 = x @ w1.T
    z = a1 @ w2.T
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    r = (p - onehot) / x.shape[0]  # dL/dz for the mean cross-entropy
    return {
        "w1": w1,
        "w2": w2,
        "x": x,
        "a1": a1,
        "z": z,
        "r": r,
        "g_a1": r @ w2,
        "g_w2": r.T @ a1,
        "g_w1": (r @ w2).T @ x,
    }


# ---- registry and interface --------------------------------------------------------------------
def test_every_required_proxy_is_registered():
    required = {
        "grad_norm",
        "snip",
        "grasp",
        "fisher",
        "synflow",
        "jacob_cov",
        "naswot",
        "zen",
        "hidden_cov",
        "attention_confidence",
        "synaptic_diversity",
        "synaptic_saliency",
        "diswot_relation",
        "diswot_semantic",
        "params",
        "flops",
    }
    assert required <= set(list_proxies())
    with pytest.raises(KeyError, match="Did you mean 'synflow'"):
        get_proxy("synflw")


def test_gradient_proxies_match_closed_form_on_two_layer_net():
    model, inputs = two_layer(), batch()
    c = closed_form(model, inputs)
    grad_norm = np.linalg.norm(c["g_w1"]) + np.linalg.norm(c["g_w2"])
    snip = np.abs(c["w1"] * c["g_w1"]).sum() + np.abs(c["w2"] * c["g_w2"]).sum()
    fisher = (
        0.5 * ((c["a1"] * c["g_a1"]) ** 2).mean(0).sum()
        + 0.5 * ((c["z"] * c["r"]) ** 2).mean(0).sum()
    )
    assert get_proxy("grad_norm").score(model, inputs) == pytest.approx(grad_norm, rel=1e-5)
    assert get_proxy("snip").score(model, inputs) == pytest.approx(snip, rel=1e-5)
    assert get_proxy("fisher").score(model, inputs) == pytest.approx(fisher, rel=1e-4)
    assert all(p.grad is None for p in model.parameters())  # no gradients left behind


def test_grasp_matches_full_hessian():
    model, inputs = two_layer(), batch()
    shapes = [p.shape for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()

    def loss(flat: torch.Tensor) -> torch.Tensor:
        w1 = flat[: shapes[0].numel()].reshape(shapes[0])
        w2 = flat[shapes[0].numel() :].reshape(shapes[1])
        z = inputs.x.double() @ w1.T @ w2.T
        return nn.functional.cross_entropy(z, inputs.y)

    hessian = torch.autograd.functional.hessian(loss, theta)
    gradient = torch.autograd.functional.jacobian(loss, theta)
    expected = float(-(theta * (hessian @ gradient)).sum())
    assert get_proxy("grasp").score(model, inputs) == pytest.approx(expected, rel=1e-4, abs=1e-9)


def test_synflow_is_twice_the_path_sum_and_restores_the_model():
    # With |W| and an all-ones input, R = 1^T |W2| |W1| 1, and each layer's synaptic flow
    # sum |theta dR/dtheta| equals R (Tanaka et al.'s conservation), so two layers give 2R.
    model, inputs = two_layer(), batch()
    c = closed_form(model, inputs)
    path_sum = np.abs(c["w2"]).sum(0) @ np.abs(c["w1"]).sum(1)
    before = copy.deepcopy(model.state_dict())
    model.train()
    assert get_proxy("synflow").score(model, inputs) == pytest.approx(2 * path_sum, rel=1e-12)
    assert model.training and model[0].weight.dtype == torch.float32
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key  # signs restored bit for bit


def test_jacob_cov_of_a_linear_net_has_one_nonzero_eigenvalue():
    # A linear net has the same input Jacobian for every sample: the correlation matrix is all
    # ones, eigenvalues (n, 0, ..., 0).
    model, inputs = two_layer(), batch(n=5)
    n = 5
    expected = -(math.log(n + K) + 1 / (n + K) + (n - 1) * (math.log(K) + 1 / K))
    assert get_proxy("jacob_cov").score(model, inputs) == pytest.approx(expected, rel=1e-6)


def test_correlation_eigen_score_of_uncorrelated_rows():
    rows = torch.tensor([[1.0, -1.0, 1.0, -1.0], [1.0, 1.0, -1.0, -1.0]])
    assert correlation_eigen_score(rows) == pytest.approx(-2 * (math.log(1 + K) + 1 / (1 + K)))
    assert math.isnan(correlation_eigen_score(torch.tensor([[1.0, 1.0], [1.0, 2.0]])))


# ---- activation proxies ------------------------------------------------------------------------
def test_naswot_hand_computed_kernel():
    # Units (x, -x, x - 1.5) after ReLU: x=1 -> 100, x=2 -> 101, x=-1 -> 010.
    # K = N_A - Hamming = [[3,2,1],[2,3,0],[1,0,3]], det = 12.
    layer = nn.Linear(1, 3)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0], [-1.0], [1.0]]))
        layer.bias.copy_(torch.tensor([0.0, 0.0, -1.5]))
    model = nn.Sequential(layer, nn.ReLU(), nn.Linear(3, 2))
    inputs = ProxyInputs(torch.tensor([[1.0], [2.0], [-1.0]]), torch.tensor([0, 1, 0]), 2)
    assert get_proxy("naswot").score(model, inputs) == pytest.approx(math.log(12))
    same_codes = torch.tensor([[1, 0], [1, 0]])
    assert naswot_kernel_logdet(same_codes) == -math.inf


def test_zen_score_formula_by_hand():
    f = torch.zeros(2, 1, 2, 2)
    g = f.clone()
    g[0, 0, 0, 0], g[1, 0, 1, 1] = 3.0, 4.0  # per-sample Frobenius norms 3 and 4 -> mean 3.5
    variances = [torch.tensor([4.0, 4.0]), torch.tensor([1.0, 9.0])]  # sqrt(mean) = 2, sqrt(5)
    expected = math.log(3.5) + math.log(2.0) + math.log(math.sqrt(5.0))
    assert zen_score(f, g, variances) == pytest.approx(expected)


def test_zen_leaves_the_model_unchanged_and_needs_a_pool():
    model = build_model("resnet_flex", widths=(8, 8, 8))
    inputs = ProxyInputs(torch.randn(8, 1, 8, 8), torch.arange(8) % 10, 10)
    before = copy.deepcopy(model.state_dict())
    score = get_proxy("zen").score(model, inputs)
    assert math.isfinite(score)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(ProxyError, match="'zen' cannot score VisionTransformer: .*pooling"):
        get_proxy("zen").score(build_model("vit", depth=1, dim=16, heads=2), inputs)


def test_hidden_cov_reads_the_last_gru_states_and_refuses_cnns():
    torch.manual_seed(0)
    model = build_model("gru", hidden_size=8, input_size=(6,))
    x = torch.randn(5, 1, 6)
    inputs = ProxyInputs(x, torch.arange(5) % 10, 10)
    with torch.no_grad():
        states, _ = model.gru(x.transpose(1, 2))  # independent route: call the GRU directly
    assert get_proxy("hidden_cov").score(model, inputs) == pytest.approx(
        correlation_eigen_score(states)
    )
    cnn = build_model("resnet_flex")
    assert not get_proxy("hidden_cov").applicable(cnn)
    with pytest.raises(ProxyError, match="'hidden_cov' cannot score FlexNet: .*recurrent"):
        get_proxy("hidden_cov").score(
            cnn, ProxyInputs(torch.randn(4, 1, 8, 8), torch.zeros(4, dtype=torch.long), 10)
        )


# ---- transformer proxies -----------------------------------------------------------------------
def test_head_confidence_by_hand():
    attention = torch.tensor([[[[1.0, 0.0], [0.5, 0.5]], [[0.25, 0.75], [0.75, 0.25]]]])
    assert head_confidence(attention).tolist() == pytest.approx([0.75, 0.75])


def test_attention_tap_reproduces_the_vit_attention_output():
    torch.manual_seed(0)
    model = build_model("vit", depth=2, dim=16, heads=4).eval()
    x = torch.randn(3, 1, 8, 8)
    attn = model.blocks[0].attn
    outputs = []
    handle = attn.register_forward_hook(lambda m, a, out: outputs.append((a[0], out)))
    maps = tap(model, x, attention=True).attention
    handle.remove()
    tokens, out = outputs[0]
    v = attn.v(tokens).reshape(3, -1, 4, 4).transpose(1, 2)
    rebuilt = attn.proj((maps[0] @ v).transpose(1, 2).reshape(3, -1, 16))
    assert len(maps) == 2 and torch.allclose(rebuilt, out, atol=1e-6)
    assert torch.allclose(maps[0].sum(-1), torch.ones(3, 4, 17))  # 16 patches + cls


def test_transformer_proxies_read_the_right_layers():
    torch.manual_seed(0)
    model = build_model("vit", depth=2, dim=16, heads=2)
    names = {id(m): n for n, m in model.named_modules()}
    assert sorted(names[id(m)] for m in mlp_layers(model)) == [
        "blocks.0.mlp.fc1",
        "blocks.0.mlp.fc2",
        "blocks.1.mlp.fc1",
        "blocks.1.mlp.fc2",
    ]
    assert len(attention_projections(model)) == 8  # q, k, v, proj per block
    inputs = ProxyInputs(torch.randn(4, 1, 8, 8), torch.arange(4), 10)
    model.train()
    nn.functional.cross_entropy(model(inputs.x), inputs.y).backward()
    saliency = sum(
        float((m.weight.detach() * m.weight.grad).abs().sum()) for m in mlp_layers(model)
    )
    diversity = sum(
        float(
            torch.linalg.matrix_norm(v.value(), "nuc") * torch.linalg.matrix_norm(v.grad(), "nuc")
        )
        for v in attention_projections(model)
    )
    assert get_proxy("synaptic_saliency").score(model, inputs) == pytest.approx(saliency, rel=1e-5)
    assert get_proxy("synaptic_diversity").score(model, inputs) == pytest.approx(
        diversity, rel=1e-5
    )


# ---- DisWOT --------------------------------------------------------------------------------------
def test_sample_relation_by_hand_and_scale_invariance():
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    expected = torch.tensor([[1, 0, 1], [0, 1, 1], [1, 1, 2]]) / torch.tensor(
        [[2**0.5], [2**0.5], [6**0.5]]
    )
    assert torch.allclose(sample_relation(features), expected)
    wider = torch.cat([features, features], dim=1) * 7.0  # other width and scale, same relations
    assert float(relation_distance(wider, features)) == pytest.approx(0.0, abs=1e-12)
    other = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    diff = (sample_relation(features) - sample_relation(other)).pow(2).sum() / 9
    assert float(relation_distance(other, features)) == pytest.approx(float(diff))


def test_class_activation_matrix_is_the_classifier_weight_gradient():
    torch.manual_seed(0)
    head = nn.Linear(5, 3)
    pooled, labels = torch.randn(4, 5), torch.tensor([0, 2, 1, 2])
    logits = head(pooled)
    nn.functional.cross_entropy(logits, labels).backward()
    assert torch.allclose(
        class_activation_matrix(logits.detach(), pooled, labels), head.weight.grad, atol=1e-7
    )
    # Narrower student, same class relations up to scale -> distance 0.
    m = torch.randn(3, 4)
    assert float(semantic_distance(torch.cat([m, m], 1), m)) == pytest.approx(0.0, abs=1e-12)


def test_diswot_proxies_score_a_copy_of_the_teacher_perfectly():
    torch.manual_seed(0)
    teacher = build_model("mlp", hidden=[16], input_size=(8, 8))
    teacher.train()
    inputs = ProxyInputs(torch.randn(8, 1, 8, 8), torch.arange(8) % 10, 10, teacher=teacher)
    student = copy.deepcopy(teacher)
    for name in ("diswot_relation", "diswot_semantic"):
        assert get_proxy(name).score(student, inputs) == pytest.approx(0.0, abs=1e-10)
        assert (
            get_proxy(name).score(build_model("mlp", hidden=[4], input_size=(8, 8)), inputs) < -1e-6
        )
    assert teacher.training  # the teacher's mode is restored
    with pytest.raises(ProxyError, match="'diswot_relation' cannot score MLP: it needs a teacher"):
        get_proxy("diswot_relation").score(student, ProxyInputs(inputs.x, inputs.y, 10))


# ---- baselines and score_architecture ----------------------------------------------------------
def test_params_and_flops_by_hand():
    model = nn.Sequential(nn.Linear(4, 3, bias=False), nn.Linear(3, 2))
    inputs = ProxyInputs(torch.randn(2, 4), torch.tensor([0, 1]), 2)
    assert get_proxy("params").score(model, inputs) == 12 + 6 + 2
    assert get_proxy("flops").score(model, inputs) == 2 * (12 + 6)


def test_score_architecture_isolates_proxies_and_restores_global_state():
    inputs = ProxyInputs(torch.randn(8, 1, 8, 8), torch.arange(8) % 10, 10)
    build = lambda: build_model("resnet_flex", widths=(8, 8, 16))  # noqa: E731
    names = ["synflow", "zen", "snip", "naswot"]
    torch.manual_seed(123)
    rng_before = torch.get_rng_state()
    with torch.no_grad():
        together = score_architecture(build, names, inputs, seed=3)
        assert not torch.is_grad_enabled()
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert torch.get_default_dtype() == torch.float32
    # Each proxy alone, after synflow mutated a model: identical (fresh, same-seeded models).
    for name in names:
        assert score_architecture(build, [name], inputs, seed=3)[name] == together[name]
    assert score_architecture(build, ["snip"], inputs, seed=4)["snip"] != together["snip"]


def test_wider_nets_score_higher_on_size_driven_proxies():
    # The paper-level claim at small scale: synflow and naswot grow with width (Abdelfattah et
    # al. and Mellor et al. both report a strong correlation with size).
    inputs = ProxyInputs(torch.randn(16, 1, 8, 8), torch.arange(16) % 10, 10)
    scores = [
        score_architecture(
            lambda w=w: build_model("resnet_flex", widths=(w, w, w)), ["synflow", "naswot"], inputs
        )
        for w in (4, 16)
    ]
    assert scores[1]["synflow"] > scores[0]["synflow"]
    assert scores[1]["naswot"] > scores[0]["naswot"]


# ---- benchmark on a tiny fake fixture ----------------------------------------------------------
def test_bench_ranks_proxies_on_a_fake_fixture():
    from bench.bench_proxies import correlation_rows, evaluate_fixture, markdown, top_pick
    from slimline.search.groundtruth import GroundTruth
    from slimline.search.space import default_space
    from slimline.training import TrainParams

    space = default_space()
    archs = space.sample(4, seed=0)
    # Accuracy grows with parameter count here, so params must rank perfectly.
    sizes = [sum(p.numel() for p in space.build_model(a).parameters()) for a in archs]
    order = np.argsort(np.argsort(sizes))
    entries = [
        {
            "arch": a.to_dict(),
            "digest": a.digest,
            "family": "resnet_flex",
            "params": s,
            "flops": s,
            "test_accuracy": [0.5 + 0.1 * r, 0.5 + 0.1 * r],
            "distilled_test_accuracy": [0.9 - 0.1 * r] * 2,
        }
        for a, s, r in zip(archs, sizes, order)
    ]
    truth = GroundTruth(
        name="fake",
        dataset="digits",
        dataset_kwargs={},
        space=space,
        train=TrainParams(),
        seeds=[0, 1],
        teacher={},
        distill={},
        architectures=entries,
        raw={"seed_to_seed": {"kendall_tau": {"test_accuracy": 1.0}}},
    )
    result = evaluate_fixture(
        truth,
        space.build_model(archs[0]),
        ["params", "naswot", "diswot_relation", "hidden_cov"],
        batch=16,
    )
    assert result["proxies"] == ["params", "naswot", "diswot_relation"]  # hidden_cov: no RNN
    rows = {r["proxy"]: r for r in result["correlations"]}
    assert rows["params"]["kendall_tau"] == pytest.approx(1.0)
    assert rows["params"]["kendall_tau_distilled"] == pytest.approx(-1.0)
    assert rows["fixture:flops"]["spearman"] == pytest.approx(1.0)
    assert result["per_family"] == {}  # one family: no per-family tables
    subset = {r["proxy"]: r for r in correlation_rows(truth, result["scores"], [0, 2, 3])}
    assert subset["params"]["scored"] == 3 and subset["params"]["kendall_tau"] == pytest.approx(1)
    (pick,) = result["diswot_vs_vanilla"]
    assert pick["best_vanilla_proxy"] == "naswot"  # size baselines are not candidates
    assert top_pick([None, 2.0, 5.0, 5.0]) == 2
    assert "Ranking on fixture `fake`" in markdown([], [result], "")
