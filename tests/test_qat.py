"""QAT (slimline.compress.quant.qat, stage quant.qat): StatsQ grid, CGA, QKR, oscillation counting."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn

import slimline
from slimline.compress.quant.qat import (
    OscillationTracker,
    QATConfig,
    QATController,
    qkr_attention,
    statsq_quantize,
    statsq_scale,
    statsq_spec,
)
from slimline.compress.quant.state import quantization_of
from slimline.models.vit import Attention


def test_statsq_scale_and_levels() -> None:
    torch.manual_seed(0)
    weight = torch.randn(3, 50)
    scale = statsq_scale(weight)
    assert torch.allclose(scale.flatten(), 2 * weight.abs().mean(1))
    for bits in (2, 3):
        n = 2**bits // 2
        q = statsq_quantize(weight, bits)
        levels = torch.unique(torch.round(q / scale * n * 2))  # 2k+1 (odd integers)
        assert set(levels.tolist()) <= set(range(-(2 * n - 1), 2 * n, 2))
        assert 0 not in levels.tolist()
    row = torch.tensor([[0.1, 0.2, 0.3, 0.4]])  # s = 0.5: levels ±s/4, ±3s/4 at 2 bits
    assert statsq_quantize(row, 2).tolist() == [[0.125, 0.125, 0.375, 0.375]]
    top = torch.tensor([[1.0, -1.0, 1.0, -1.0]])  # w = ±s/2; clipped edge stays a level
    assert statsq_quantize(top * 2, 2).abs().max() <= 0.75 * 4


def test_statsq_export_grid_is_exact() -> None:
    torch.manual_seed(1)
    weight = torch.randn(4, 16)
    spec, values = statsq_spec(weight, 3)
    assert spec.on_grid(values) and spec.qmax >= 7
    assert torch.allclose(values, statsq_quantize(weight, 3), atol=1e-6)
    integers = spec.quantize(values)
    assert bool((integers % 2 != 0).all())


def test_oscillation_counter_on_a_hand_made_sequence() -> None:
    tracker = OscillationTracker(momentum=0.5, threshold=0.1)
    events = [
        int(tracker.update("w", torch.tensor([float(v)])).item()) for v in (0, 1, 0, 1, 1, 2, 1)
    ]
    # +1, -1 (flip back), +1 (back), stay, +1 (same way: no), -1 (back)
    assert events == [0, 0, 1, 1, 0, 0, 1]
    assert tracker.share() == 1.0


def test_qkr_is_the_same_fp32_function() -> None:
    torch.manual_seed(0)
    attention = Attention(16, 4)
    x = torch.randn(2, 5, 16)
    assert torch.allclose(qkr_attention(attention, x, lambda m: m), attention(x), atol=1e-5)


def test_cga_trains_only_weights_near_a_boundary_and_anneals() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    controller = QATController(
        model, QATConfig(weight_bits=2, activation_bits=4, skip=None, boundary_range=0.2)
    )
    controller.install(torch.randn(32, 8))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    shares = [controller.start_annealing()]
    assert 0 < shares[0] < 1
    for _ in range(8):
        # the set chosen before this step (from the weights as they are now)
        before = {n: (p.detach().clone(), m) for n, (p, m, _) in controller.frozen.entries.items()}
        loss = model(torch.randn(16, 8)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        controller.after_step()
        for name, (old, mask) in before.items():
            parameter = controller.frozen.entries[name][0].detach()
            assert torch.equal(parameter[mask], old[mask])  # frozen: untouched by AdamW
            if (~mask).any():
                assert not torch.equal(parameter[~mask], old[~mask])  # the rest trained
        shares.append(controller.frozen.share())
    # Re-chosen every step (the authors' script): weights leave the band and stay held, so the
    # frozen share only grows (up to StatsQ's scale moving a held weight back into the band).
    assert shares[-1] > shares[0] + 0.05, shares
    state = controller.finish()
    assert set(state.weights) == {"0.weight", "2.weight"}
    assert {n for n, _ in model.named_parameters()} == {"0.weight", "0.bias", "2.weight", "2.bias"}


def test_cga_treats_clipped_statsq_weights_as_confident() -> None:
    layer = nn.Linear(8, 1, bias=False)
    weights = [6.0, -6.0, 0.825, 0.01, 0.2, 0.2, 0.2, 0.2]  # s = 2·mean|w| ≈ 3.41
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([weights]))
    controller = QATController(
        nn.Sequential(layer), QATConfig(weight_bits=2, activation_bits=8, skip=None,
                                        boundary_range=0.1)
    )
    controller.install(torch.randn(2, 8))
    controller.start_annealing()
    (_, mask, _), = controller.frozen.entries.values()
    # Position clamp(w/s, -1, 1)·2 − 1/2; boundaries at −1.5, −0.5, 0.5. ±6 are clipped (raw
    # positions 1.5 and −2.5 look like boundaries but are not: frozen); 0.825 → −0.016 and
    # 0.2 → −0.38 are > 0.1 from −0.5 (frozen); 0.01 → −0.494 is on the boundary (trains).
    assert mask.tolist() == [[True, True, True, False, True, True, True, True]]


@pytest.mark.parametrize("quantizer", ["lsq", "statsq"])
def test_quant_qat_stage_attaches_the_state(tmp_path: Path, tiny_recipe, quantizer) -> None:
    tiny_recipe["model"] = {"name": "vit", "with": {"dim": 16, "depth": 1, "heads": 2}}
    extra = {"cga": True, "cga_epochs": 1, "qkr": True} if quantizer == "statsq" else {}
    tiny_recipe["stages"] = [
        {
            "id": "qat",
            "uses": "quant.qat",
            "with": {
                "weight_quantizer": quantizer,
                "epochs": 2,
                "weight_bits": 3,
                "activation_bits": 4,
                **extra,
            },
        },
    ]
    result = slimline.run(tiny_recipe, run_dir=tmp_path, progress=False)
    metrics = result.record("qat").metrics
    assert len(metrics["oscillation_share_per_epoch"]) == 2
    artifact = result.artifact("qat")
    assert artifact.files["oscillation_plot"].exists()
    state = quantization_of(artifact.model)
    assert state is not None and "blocks.0.mlp.fc1.weight" in state.weights
    assert ("blocks.0.attn.q.weight" in state.weights) == (quantizer == "lsq")
    fc1 = artifact.model.blocks[0].mlp.fc1.weight
    assert state.weights["blocks.0.mlp.fc1.weight"].on_grid(fc1.detach())
