"""Search space, ``resnet_flex`` and the latency lookup table (``slimline profile lut``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from slimline.cli import main as slimline_main
from slimline.export import main_profile
from slimline.export.lut import LatencyTable, LutEntry, LutError, interleaved_timings
from slimline.export.lut_blocks import export_block
from slimline.models import build_model
from slimline.search.architecture import Architecture
from slimline.search.space import SearchSpace
from slimline.search.space_loading import load_space

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_SPACE = {
    "name": "tiny",
    "input_shape": [1, 8, 8],
    "num_classes": 10,
    "stages": [
        {"widths": [4, 8], "depths": [1, 2], "kernels": [3], "stride": 1},
        {"widths": [8, 16], "depths": [1], "kernels": [3, 5], "stride": 2},
    ],
}


@pytest.fixture(scope="module")
def space() -> SearchSpace:
    return SearchSpace.from_dict(TINY_SPACE)


@pytest.fixture(scope="module")
def built_lut(tmp_path_factory) -> tuple[Path, Path]:
    """``slimline profile lut space.yaml -o lut.json --blocks-dir blocks``, run once."""
    folder = tmp_path_factory.mktemp("lut")
    space_file = folder / "space.yaml"
    space_file.write_text(json.dumps(TINY_SPACE))  # JSON is YAML
    argv = ["lut", str(space_file), "-o", str(folder / "lut.json"), "--blocks-dir"]
    argv += [str(folder / "blocks"), "--runs", "100", "--rounds", "5", "--warmup", "5"]
    assert slimline_main(["profile", *argv]) == 0
    return folder / "lut.json", folder / "blocks"


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"input_shape": [1, 8]}, "input_shape: expected"),
        ({"stages": []}, "stages: expected a non-empty list"),
        ({"stages": [{"widths": [4], "depths": [1], "kernels": [4]}]}, r"stages\[0\].kernels: "),
        ({"stages": [{"widths": [4, 4], "depths": [1]}]}, r"stages\[0\].widths: choices repeat"),
        ({"stages": [{"widths": [4], "depth": [1]}]}, r"stages\[0\].depth: unknown key"),
        ({"family": "lstm"}, "family: unknown family 'lstm'"),
    ],
)
def test_space_validation_names_the_key(change, match, tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(json.dumps(TINY_SPACE | change))
    with pytest.raises(ValueError, match=f"{path}: {match}"):
        load_space(path)


def test_sampling_is_deterministic_and_equal_architectures_hash_equally(space):
    assert space.size == 16
    first, again = space.sample(6, seed=3), space.sample(6, seed=3)
    assert first == again and len(set(first)) == 6
    assert space.sample(6, seed=4) != first
    assert sorted(map(str, space.sample(100, seed=0))) == sorted(map(str, space.sample(16)))
    arch = first[0]
    copy = Architecture.from_dict(json.loads(json.dumps(arch.to_dict())))
    assert copy == arch and hash(copy) == hash(arch) and copy.digest == arch.digest
    assert len({a.digest for a in space.sample(16)}) == 16
    with pytest.raises(ValueError, match="stage 1 width 12 is not in space 'tiny'"):
        space.validate(Architecture((4, 12), (1, 1), (3, 3)))


def test_blocks_chain_into_the_built_model_and_distinct_blocks_cover_the_space(space):
    distinct = {b.key for b in space.distinct_blocks()}
    used = set()
    for arch in space.sample(16):
        blocks = space.blocks(arch)
        assert len(blocks) == 2 + sum(arch.depths)
        used |= {b.key for b in blocks}
    assert used == distinct and len(distinct) == 14

    arch = Architecture((8, 16), (2, 1), (3, 5))
    model = space.build_model(arch).eval()
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        h = x
        for block in space.blocks(arch):  # each block's shapes feed the next
            assert h.shape[1:] == (block.in_channels, *block.input_size)
            h = space.build_block(block).eval()(h)
        assert h.shape == model(x).shape == (2, 10)
    assert str(arch) == "w8d2k3-w16d1k5" and space.model_spec(arch)["name"] == "resnet_flex"


def test_resnet_flex_reproduces_resnet8():
    flex = build_model("resnet_flex", widths=[16, 32, 64], depths=[1, 1, 1])
    reference = build_model("resnet", depth=8, width=16)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(flex) == count(reference)
    with pytest.raises(ValueError, match="one entry per stage"):
        build_model("resnet_flex", widths=[8, 16], depths=[1])


def test_predictor_sums_a_handmade_table(tmp_path):
    entries = {
        k: LutEntry(k, ms, ms + 0.01, ms + 0.02, 10, weight_bytes=100)
        for k, ms in (("stem", 0.1), ("block", 0.25), ("head", 0.05))
    }
    table = LatencyTable(entries, overhead_ms=0.02, batch_size=1, threads=1, machine={})
    assert table.predict(["stem", "block", "block", "head"]) == pytest.approx(0.67)
    assert table.breakdown(["head"]) == [("head", 0.05)]
    assert table.weight_bytes(["stem", "block", "block"]) == 300
    with pytest.raises(LutError, match="no entry for other, unknown"):
        table.predict(["stem", "unknown", "other"])
    loaded = LatencyTable.load(table.save(tmp_path / "lut.json"))
    assert loaded.entries == table.entries and loaded.overhead_ms == 0.02
    (tmp_path / "bad.json").write_text('{"format": "something else"}')
    with pytest.raises(LutError, match="not a slimline latency table"):
        LatencyTable.load(tmp_path / "bad.json")


def test_lut_predicts_measured_latency_of_whole_architectures(space, built_lut, tmp_path):
    table = LatencyTable.load(built_lut[0])
    assert len(table.entries) == 14 and table.threads == 1 and table.batch_size == 1
    assert table.overhead_ms > 0 and table.meta["space"]["name"] == "tiny"
    assert all(e.ms >= 0 and e.runs == 100 for e in table.entries.values())
    assert all(e.weight_bytes > 0 for e in table.entries.values())

    archs = [Architecture((4, 8), (1, 1), (3, 3)), Architecture((8, 16), (2, 1), (3, 5))]
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    sessions = []
    for i, arch in enumerate(archs):
        path = export_block(space.build_model(arch), (1, 1, 8, 8), tmp_path / f"arch{i}.onnx")
        sessions.append(
            ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        )
    feeds = [{"input": np.zeros((1, 1, 8, 8), np.float32)}] * len(archs)
    for arch, samples in zip(archs, interleaved_timings(sessions, feeds, runs=200, rounds=5)):
        measured = float(np.median(samples))
        keys = space.block_keys(arch)
        predicted = table.predict(keys)
        naive = sum(table.entries[k].median_ms for k in keys)  # overhead counted per block
        # Loose: the machine is shared, and these models run in tens of microseconds (a loaded
        # CI neighbour shifts the table's per-block times by half of that); the accuracy
        # figures are bench/bench_lut.py's. The overhead correction must beat naive summing.
        assert abs(predicted - measured) < measured, (arch, predicted, measured)
        assert abs(predicted - measured) < abs(naive - measured), (arch, predicted, naive)


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["lut", "{bad}", "-o", "{out}"], "input_shape: expected"),
        (["lut", "{dir}", "-o", "{out}"], "has no manifest.json"),
        (["lut", "{space}", "--export-only"], "--export-only needs --blocks-dir"),
        (["lut", "{space}", "-o", "{out}", "--batch-sizes", "1,8"], "one batch size"),
        (["lut", "{space}", "-o", "{out}", "--csv", "x.csv"], "--csv do not apply"),
        (["lut"], "usage: slimline profile lut"),
    ],
)
def test_lut_cli_bad_input_exits_2_and_writes_nothing(argv, match, tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("name: bad\ninput_shape: [1, 8]\nstages: []\n")
    (tmp_path / "space.yaml").write_text(json.dumps(TINY_SPACE))
    (tmp_path / "empty").mkdir()
    names = {
        "bad": tmp_path / "bad.yaml",
        "dir": tmp_path / "empty",
        "space": tmp_path / "space.yaml",
        "out": tmp_path / "lut.json",
    }
    assert slimline_main(["profile", *[a.format(**names) for a in argv]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("slimline profile lut: error:") and match in err[-1]
    assert not (tmp_path / "lut.json").exists()


def test_the_torch_free_entry_takes_blocks_folders_not_spaces(tmp_path, capsys):
    """``python -m slimline.export lut`` sits below the search code: a space file is refused
    with the command that exports its blocks."""
    (tmp_path / "space.yaml").write_text(json.dumps(TINY_SPACE))
    assert main_profile(["lut", str(tmp_path / "space.yaml"), "-o", str(tmp_path / "l.json")]) == 2
    err = capsys.readouterr().err
    assert "is a search space" in err and "--export-only" in err
    assert not (tmp_path / "l.json").exists()


def test_lut_from_a_blocks_folder_measures_without_torch(built_lut, tmp_path):
    script = textwrap.dedent(
        """
        import sys

        class BlockTorch:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch is blocked in this test")
                return None

        sys.meta_path.insert(0, BlockTorch())
        from slimline.export.profile_cli import main_profile

        code = main_profile(["lut", sys.argv[1], "-o", sys.argv[2], "--runs", "10",
                             "--rounds", "2", "--warmup", "1"])
        assert code == 0 and "torch" not in sys.modules, code
        """
    )
    out = tmp_path / "device-lut.json"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run(
        [sys.executable, "-c", script, str(built_lut[1]), str(out)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    table = LatencyTable.load(out)
    assert set(table.entries) == set(LatencyTable.load(built_lut[0]).entries)
