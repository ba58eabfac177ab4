"""``profile.latency``: onnxruntime latency of the exported model (median, p90, p99), with a
per-op-type breakdown and, for an int8 model, the reasons it may not beat fp32 here."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from slimline.artifact import Artifact
from slimline.io import write_json
from slimline.params import ParamError, param
from slimline.stage import StageContext, register_stage


@dataclass
class ProfileParams:
    batch_sizes: list[int] = param([1, 32], help="batch sizes to time")
    runs: int = param(200, help="timed runs per batch size")
    warmup: int = param(20, help="untimed runs first")
    threads: int = param(1, help="onnxruntime intra-op threads (fixed for comparable numbers)")
    inter_op_threads: int = param(1, help="onnxruntime inter-op threads")
    providers: list[str] = param(["CPUExecutionProvider"], help="execution providers, in order")
    per_op: bool = param(True, help="per-op-type breakdown from onnxruntime's profiler")
    per_op_runs: int = param(50, help="profiled runs per batch size for the breakdown")
    seq_len: int | None = param(
        None, help="token models: sequence length timed (default: the dataset's)")

    def __post_init__(self) -> None:
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ParamError("batch_sizes", "give one or more positive batch sizes")
        if self.runs < 1 or self.warmup < 0 or self.threads < 1 or self.inter_op_threads < 1:
            raise ParamError(None, "runs and threads must be >= 1, warmup >= 0")
        if self.per_op_runs < 1:
            raise ParamError("per_op_runs", "must be at least 1")


@register_stage("profile.latency", ProfileParams)
def profile_latency(ctx: StageContext, inputs: list[Artifact], p: ProfileParams) -> Artifact:
    """Time the exported ONNX model with onnxruntime (warm-up, fixed threads, batch sweep)."""
    onnx_path = inputs[0].files.get("onnx")
    if onnx_path is None:
        raise ctx.fail("needs an exported model: put an export.onnx stage in its 'needs'")
    from slimline.export.latency import profile_onnx

    out = inputs[0].derive()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            report = profile_onnx(
                onnx_path,
                batch_sizes=tuple(p.batch_sizes),
                warmup=p.warmup,
                runs=p.runs,
                intra_op_threads=p.threads,
                inter_op_threads=p.inter_op_threads,
                providers=tuple(p.providers),
                per_op=p.per_op,
                per_op_runs=p.per_op_runs,
                seq_len=p.seq_len or (inputs[0].input_shape[0] if inputs[0].inputs.is_tokens
                                      else None),
            )
        except (OSError, ValueError) as exc:
            raise ctx.fail(str(exc)) from None
    for warning in caught:  # int8 diagnostics, provider fallbacks: worth seeing in the log
        ctx.log(f"warning: {warning.message}")
    path = write_json(ctx.work_dir / "latency.json", report.to_dict())
    out.files["latency"] = path
    first = report.batches[0]
    out.metrics = {
        "median_ms": first.median_ms,
        "p90_ms": first.p90_ms,
        "p99_ms": first.p99_ms,
        "batch_size": first.batch_size,
        "onnx_bytes": onnx_path.stat().st_size,
        "by_batch": {
            str(b.batch_size): {
                "median_ms": b.median_ms,
                "p90_ms": b.p90_ms,
                "p99_ms": b.p99_ms,
                "throughput": b.throughput,
            }
            for b in report.batches
        },
        "threads": p.threads,
        "providers": list(report.providers),
        "quant_format": report.quant_format,
        "int8_warnings": list(report.diagnostics),
    }
    if report.seq_len is not None:
        out.metrics["seq_len"] = report.seq_len
    if report.op_profiles:
        out.metrics["op_breakdown"] = {
            str(profile.batch_size): {
                "ops": {
                    op.op_type: {"share": op.share, "ms_per_run": op.ms_per_run, "nodes": op.nodes}
                    for op in profile.ops
                },
                "kernel_ms": profile.kernel_ms,
                "run_ms": profile.run_ms,
                "overhead_share": profile.overhead_share,
            }
            for profile in report.op_profiles
        }
        top = report.op_profiles[0].ops[0]
        out.metrics["top_op"] = {"op_type": top.op_type, "share": top.share}
    return out
