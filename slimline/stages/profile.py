"""``profile.latency``: onnxruntime latency of the exported model (median, p90, p99)."""

from __future__ import annotations

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

    def __post_init__(self) -> None:
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ParamError("batch_sizes", "give one or more positive batch sizes")
        if self.runs < 1 or self.warmup < 0 or self.threads < 1 or self.inter_op_threads < 1:
            raise ParamError(None, "runs and threads must be >= 1, warmup >= 0")


@register_stage("profile.latency", ProfileParams)
def profile_latency(ctx: StageContext, inputs: list[Artifact], p: ProfileParams) -> Artifact:
    """Time the exported ONNX model with onnxruntime (warm-up, fixed threads, batch sweep)."""
    onnx_path = inputs[0].files.get("onnx")
    if onnx_path is None:
        raise ctx.fail("needs an exported model: put an export.onnx stage in its 'needs'")
    from export.latency import profile_onnx

    out = inputs[0].derive()
    report = profile_onnx(onnx_path, batch_sizes=tuple(p.batch_sizes), warmup=p.warmup,
                          runs=p.runs, intra_op_threads=p.threads,
                          inter_op_threads=p.inter_op_threads, providers=tuple(p.providers))
    path = write_json(ctx.work_dir / "latency.json", report.to_dict())
    out.files["latency"] = path
    first = report.batches[0]
    out.metrics = {
        "median_ms": first.median_ms, "p90_ms": first.p90_ms, "p99_ms": first.p99_ms,
        "batch_size": first.batch_size, "onnx_bytes": onnx_path.stat().st_size,
        "by_batch": {str(b.batch_size): {"median_ms": b.median_ms, "p90_ms": b.p90_ms,
                                         "p99_ms": b.p99_ms, "throughput": b.throughput}
                     for b in report.batches},
        "threads": p.threads, "providers": list(report.providers),
    }
    return out
