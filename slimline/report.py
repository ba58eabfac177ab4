"""``report.md`` and ``report.png`` for a run: one row per stage, accuracy vs latency per model."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from slimline.io import atomic_path, write_text

if TYPE_CHECKING:
    from slimline.runner import RunResult, StageRecord

COLUMNS = ("stage", "uses", "status", "time (s)", "params", "non-zero", "accuracy",
           "agreement", "ONNX size", "latency (ms)")


def write_report(result: RunResult) -> tuple[Path, Path]:
    """Write both files atomically into the run directory and return their paths."""
    from slimline.versions import versions

    points = model_points(result.records)
    plot_path = plot_accuracy_latency(points, result.run_dir / "report.png")
    lines = [f"# {result.recipe.name}", "",
             f"Recipe: `{result.recipe.source}` · seed {result.recipe.seed}", "",
             f"Target: `{result.target.name}` ({_target_origin(result)}). "
             f"int8 scheme: {result.target.scheme.reason}.", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_row(record)) + " |" for record in result.records]
    lines += ["", "Accuracy is top-1 on the eval stage's split; agreement is the share of samples "
              "whose top-1 class matches the parent model's; latency is the onnxruntime median at "
              "the first profiled batch size.", ""]
    if points:
        lines += ["## Models", "", "| model → exported file (stages) | accuracy | latency (ms) | "
                  "ONNX size |",
                  "|---|---|---|---|"]
        lines += [f"| {p['model']} | {_pct(p.get('accuracy'))} | {_num(p.get('latency_ms'))} | "
                  f"{_size(p.get('onnx_bytes'))} |" for p in points]
        lines.append("")
    lines += [f"![accuracy vs latency]({plot_path.name})", "", "## Details", ""]
    for record in result.records:
        details = _details(record)
        charts = sorted(record.directory.glob("*.png")) if record.directory.exists() else []
        details += [f"![{record.id}: {chart.stem}]({chart.relative_to(result.run_dir)})"
                    for chart in charts]
        if details:
            lines += [f"### {record.id}", "", *details, ""]
    lines += ["## Versions", ""]
    lines += [f"- {name}: {value}" for name, value in versions().items()]
    report_path = write_text(result.run_dir / "report.md", "\n".join(lines) + "\n")
    return report_path, plot_path


def model_points(records: list[StageRecord]) -> list[dict[str, Any]]:
    """One point per deployable: each exported ONNX file (latency from the profiles of that file,
    accuracy from an onnxruntime eval of it, else from the PyTorch eval of the model it holds),
    plus models that were evaluated but never exported."""
    torch_accuracy: dict[str, float] = {}
    points: dict[str, dict[str, Any]] = {}
    for record in records:
        metrics, source = record.metrics, record.onnx_source
        if not metrics or record.model_id is None:
            continue
        if (record.uses == "eval" and metrics.get("split") == "test"
                and metrics.get("accuracy") is not None):
            if str(metrics.get("backend", "")).startswith("onnx") and source:
                points.setdefault(source, {})["onnx_accuracy"] = metrics["accuracy"]
            else:
                torch_accuracy[record.model_id] = metrics["accuracy"]
        if source:
            point = points.setdefault(source, {})
            point["model_id"] = record.model_id
            if "median_ms" in metrics:
                point["latency_ms"], point["p90_ms"] = metrics["median_ms"], metrics["p90_ms"]
            if "onnx_bytes" in metrics:
                point["onnx_bytes"] = metrics["onnx_bytes"]
    result = []
    for source, point in points.items():
        accuracy = point.pop("onnx_accuracy", torch_accuracy.get(point.get("model_id", "")))
        label = f"{point.get('model_id')} → {source}"
        result.append({"model": label, **({"accuracy": accuracy} if accuracy is not None else {}),
                       **point})
    exported = {p.get("model_id") for p in points.values()}
    result += [{"model": model_id, "accuracy": accuracy}
               for model_id, accuracy in torch_accuracy.items() if model_id not in exported]
    return [p for p in result if "accuracy" in p or "latency_ms" in p]


def plot_accuracy_latency(points: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4), dpi=120)
    complete = [p for p in points if "accuracy" in p and "latency_ms" in p]
    for point in complete:
        x, y = point["latency_ms"], 100 * point["accuracy"]
        # The bar reaches the p90 latency: a point alone hides how noisy the timing was.
        spread = max(point.get("p90_ms", x) - x, 0.0)
        axes.errorbar(x, y, xerr=[[0.0], [spread]], fmt="o", capsize=3, markersize=6)
        axes.annotate(point["model"], (x, y), textcoords="offset points", xytext=(5, 5),
                      fontsize=8)
    if complete:
        axes.set_xlim(left=0)  # latency ratios read honestly only from zero
        axes.set_ylim(top=min(100.5, axes.get_ylim()[1]))
    if not complete:
        axes.text(0.5, 0.5, "no model has both an eval and a latency profile",
                  ha="center", va="center", transform=axes.transAxes)
    axes.set_xlabel("latency, median (ms)")
    axes.set_ylabel("top-1 accuracy (%)")
    axes.set_title("accuracy vs latency per model")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    plt.close(figure)
    return path


def _row(record: StageRecord) -> list[str]:
    m = record.metrics
    return [f"`{record.id}`", f"`{record.uses}`", record.status,
            f"{record.seconds:.1f}" if record.status == "ran" else "–",
            _int(m.get("parameters")), _int(m.get("nonzero_parameters")),
            _pct(m.get("accuracy", m.get("val_accuracy"))), _pct(m.get("agreement")),
            _size(m.get("onnx_bytes")), _num(m.get("median_ms"))]


def _details(record: StageRecord) -> list[str]:
    m = record.metrics
    out = []
    if "accuracy_delta" in m:
        out.append(f"- accuracy {_pct(m['accuracy'])} vs reference `{m['reference']}` "
                   f"{_pct(m['reference_accuracy'])}; logit MSE {m['logit_mse']:.4g}, "
                   f"top-1 agreement {_pct(m['agreement'])}")
    if "cosine_mean" in m:
        knn = next((k for k in m if k.startswith("knn")), None)
        out.append(f"- embeddings vs reference `{m.get('reference')}`: cosine mean "
                   f"{m['cosine_mean']:.4f}, min {m['cosine_min']:.4f}"
                   + (f"; {knn.split('_')[0][3:]}-NN overlap {_pct(m[knn])}" if knn else ""))
    if "layer_sparsity" in m:
        out.append(f"- sparsity {_pct(m['sparsity'])} (target {_pct(m['target_sparsity'])}); "
                   "per layer: " + ", ".join(f"`{k}` {_pct(v)}"
                                             for k, v in m["layer_sparsity"].items()))
    if "distortion" in m:
        parts = [f"output distortion {m['distortion']:.4g} (logit MSE vs the input model, "
                 f"{m.get('distortion_data', '?')} inputs)"]
        if isinstance(m.get("predicted_distortion"), (int, float)):
            parts.append(f"DP-predicted sum {m['predicted_distortion']:.4g}")
        if isinstance(m.get("additivity"), (int, float)):
            parts.append(f"additivity r = {m['additivity']:.3f} (joint vs summed single-layer "
                         "distortion over random allocations)")
        out.append("- " + "; ".join(parts))
    if "max_abs_diff" in m:
        agreement = (f"least cosine {m['cosine_min']:.4f}" if m.get("outputs") == "embedding"
                     else f"top-1 agreement {_pct(m['top1_agreement'])}")
        out.append(f"- parity vs PyTorch: max |diff| {m['max_abs_diff']:.3g}, {agreement} "
                   f"on {m['parity_samples']} samples")
        out.append(f"- ONNX: {_size(m['onnx_bytes'])}, {_int(m['onnx_parameters'])} parameters, "
                   f"weight sparsity in the initializers {_pct(m['onnx_sparsity'])}; ops: "
                   + ", ".join(f"{k}×{v}" for k, v in sorted(m["op_counts"].items())))
    if m.get("target") and m.get("weight_bits_used"):
        lowered = m.get("weight_bits_lowered", 0)
        out.append(f"- int8 grid for `{m['target']}`: weight bits used "
                   f"{m['weight_bits_used']}" + (f"; {lowered} layers lowered from "
                   f"{m.get('weight_bits')} bits so that CPU computes them exactly"
                   if lowered else ""))
    if m.get("parity_backend"):
        out.append(f"- parity checked on {m['parity_backend']}")
    if m.get("note"):
        out.append(f"- note: {m['note']}")
    if "by_batch" in m:
        out.append("- latency by batch size: " + "; ".join(
            f"bs {bs}: median {v['median_ms']:.3f} ms, p90 {v['p90_ms']:.3f}, "
            f"p99 {v['p99_ms']:.3f}" for bs, v in m["by_batch"].items()))
    if "search" in m:
        s, c = m["search"], m["search"]["chosen"]
        latency = f", {c['latency_ms']:.4f} ms" if c.get("latency_ms") is not None else ""
        out.append(f"- {s['strategy']} search over `{s['space']}`: {s['evaluated']} evaluated, "
                   f"{s['feasible']} within the limits; chosen `{c['label']}` "
                   f"({c['params']:,} parameters{latency}); details in `search.md`")
    if "epochs" in m and all("val_accuracy" in e for e in m["epochs"]):
        out.append("- val accuracy by epoch: " + ", ".join(
            f"{e['val_accuracy']:.3f}" for e in m["epochs"]))
    return out


def _target_origin(result: RunResult) -> str:
    if result.recipe.target != "auto":
        return "set by the recipe or --target"
    from slimline.export.machine import machine_info

    return f"auto: this machine, {machine_info()['cpu']}"


def _int(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else "–"


def _pct(value: Any) -> str:
    return f"{100 * value:.2f}%" if isinstance(value, (int, float)) else "–"


def _num(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else "–"


def _size(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return "–"
    return f"{value / 1024:.1f} KiB" if value < 1024**2 else f"{value / 1024**2:.2f} MiB"
