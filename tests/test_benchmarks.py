"""The scale benchmark runs end to end at a tiny size on CPU, and what it reports is consistent (CI proves the script
works; the figures themselves come from runs on a quiet machine or a GPU, never from a timed test)."""

import importlib.util
from pathlib import Path

import pytest


def _load(name: str):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_scale_runs_at_tiny_size(capsys):
    bench = _load("gpu_scale")
    out = bench.main(["--shape", "tiny", "--reps", "1", "--harvest-batches", "3"])
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("{")
    assert out["device"] == "cpu" and out["n_layers"] == 4 and out["lens_rows"] == 5 * 2 * 64
    for key in ("trace_all_ratio", "stop_early_ratio", "lens_last_ratio", "lens_all_ratio", "harvest_ratio"):
        assert out[key] > 0, key
    # captures of the last position own their memory: one vector per row and layer, not the whole activation
    assert out["last_pos_mem_bytes"] == 4 * 2 * 128 * 4
    assert out["all_pos_mem_bytes"] == 4 * 2 * 64 * 128 * 4
    assert out["harvest_peak_extra_shards"] <= 2


def test_gpu_scale_needs_a_shape_or_a_model():
    bench = _load("gpu_scale")
    with pytest.raises(SystemExit):
        bench.main([])


def test_graph_speed_runs_at_tiny_size(tmp_path, capsys):
    from workbench.core.models import load_model
    from workbench.methods.circuits.transcoder import save_transcoders
    from workbench.testing.tiny import random_transcoders

    model = load_model("tiny-smollm2")
    save_transcoders(random_transcoders(model), tmp_path / "tc")
    out = _load("graph_speed").main(["--model", "tiny-smollm2", "--transcoders", str(tmp_path / "tc"),
                                     "--budgets", "4", "8", "16", "--tokens", "12"])
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("{")
    assert [out["rows"][b] for b in (4, 8, 16)] == sorted(out["rows"][b] for b in (4, 8, 16))
    assert out["seconds_per_row_slope"] == out["seconds_per_row_slope"] and out["backward_per_forward"] > 0
