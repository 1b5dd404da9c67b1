"""The logit-lens study of notebook 01: its config, smoke sizing, run, result protocol and save."""

import json

import pytest

from workbench.core.models import load_model
from workbench.studies.logit_lens.study import (
    PROMPTS,
    LogitLensConfig,
    LogitLensResult,
    run_logit_lens_study,
)
from workbench.studies.notebook import StudyResult


def test_config_declares_one_target_per_prompt():
    with pytest.raises(ValueError, match=r"prompts=.*targets=\(' a',\) is not allowed: need one target per prompt"):
        LogitLensConfig(targets=[" a"])
    with pytest.raises(ValueError, match=r"layers=\(-1,\)"):
        LogitLensConfig(layers=(-1,))
    with pytest.raises(ValueError, match=r"prompts=\(\)"):
        LogitLensConfig(prompts=(), targets=())
    smoke = LogitLensConfig.smoke_config(prompts=["a b", "c d", "e f"], targets=[" x", " y", " z"])
    assert smoke.smoke and smoke.prompts == ("a b", "c d") and smoke.targets == (" x", " y") and smoke.layers is None
    assert LogitLensConfig().prompts == PROMPTS


def test_smoke_run_reads_three_layers_and_saves(tmp_path):
    m = load_model("tiny-smollm2")  # the tiny registered model the notebook tests use
    cfg = LogitLensConfig.smoke_config()
    result = run_logit_lens_study(cfg, model=m)
    assert isinstance(result, LogitLensResult) and isinstance(result, StudyResult)
    assert sorted(result.lens.layer.unique()) == [0, m.n_layers // 2, m.n_layers]
    assert set(result.tables()) == {"lens", "lens_target_summary"}
    assert set(result.figures()) == {"lens_heatmap", "lens_target_curve"}
    assert len(result.summary()) == 2
    assert {"lens", "summary", "total"} <= set(result.timings)
    paths = result.save(tmp_path / "out", m)
    assert paths["lens"].is_file()
    study = json.loads((tmp_path / "out" / "study.json").read_text())
    assert study["config"]["layers"] == [0, m.n_layers // 2, m.n_layers]
