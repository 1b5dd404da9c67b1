"""The one ``workbench`` command line: the builders' subcommands (``train-lens``, ``train-sae``, ``build-testbed``)
parse their options and hand them to the library functions, and bad input exits with status 2, naming the bad
value, before any model loads. The library functions are replaced here: nothing heavy runs."""

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

import workbench.batch.cli as cli
import workbench.studies.tuned_lens_patching.train as lens_train
from workbench.data.vqa import VARIANTS
from workbench.io.owned import FolderOwnershipError
from workbench.methods.tuned_lens import KIND, TunedLensError
from workbench.studies.sae_features import study as sae_study
from workbench.testbed import model as testbed_model

ROOT = Path(__file__).resolve().parents[2]


def _status(argv: list[str]) -> int:
    """``main``'s exit status: its return value, or the code argparse exits with."""
    try:
        return cli.main(argv)
    except SystemExit as e:
        return e.code


@pytest.fixture
def calls(monkeypatch):
    """Replace the builders the CLI calls; record each call's arguments. Anything heavy fails the test."""
    seen: dict[str, list] = {}

    def record(name, result):
        def fake(*args, **kwargs):
            seen.setdefault(name, []).append((args, kwargs))
            return result
        return fake

    monkeypatch.setattr(cli, "build_tuned_lens", record("build_tuned_lens", ("LENS", Path("out/tuned-lens"))))
    monkeypatch.setattr(cli, "lens_summary", lambda lens, folder: f"summary of {lens} in {folder}")
    monkeypatch.setattr(cli, "harvest_training_store", record("harvest_training_store", {"store": "s", "n_tokens": 3}))
    monkeypatch.setattr(cli, "build_saes", record("build_saes", [{"sae": "k", "fvu": 0.1}]))
    monkeypatch.setattr(cli, "build_testbed", record("build_testbed", []))

    def heavy(*a, **k):
        raise AssertionError("heavy work started")

    for module, name in ((lens_train, "load_model"), (lens_train, "train_tuned_lens"), (sae_study, "build_sae"),
                         (sae_study, "training_store"), (testbed_model, "train_testbed")):
        monkeypatch.setattr(module, name, heavy)
    return seen


# -- train-lens ------------------------------------------------------------------------------------------------

def test_train_lens_passes_its_options_to_the_library(calls, capsys, tmp_path):
    assert _status(["train-lens", "smollm2-135m"]) == 0
    assert calls["build_tuned_lens"] == [(("smollm2-135m", "cpu"), dict(steps=None, seed=0, device=None, out=None,
                                                                       overwrite=False))]
    assert "summary of LENS in out/tuned-lens" in capsys.readouterr().out
    out = str(tmp_path / "lens")
    assert _status(["train-lens", "smollm2-135m", "--recipe", "gpu", "--steps", "7", "--seed", "3", "--device",
                    "cpu", "--out", out, "--overwrite"]) == 0
    assert calls["build_tuned_lens"][1] == (("smollm2-135m", "gpu"), dict(steps=7, seed=3, device="cpu", out=out,
                                                                        overwrite=True))


def test_train_lens_accepts_a_local_folder(calls, tmp_path):
    assert _status(["train-lens", str(tmp_path)]) == 0
    assert calls["build_tuned_lens"][0][0] == (str(tmp_path), "cpu")


@pytest.mark.parametrize("argv, named", [
    (["train-lens", "no-such-model"], "no-such-model"),
    (["train-lens", "./missing/folder"], "missing/folder"),
    (["train-lens", "smollm2-135m", "--recipe", "tpu"], "tpu"),
    (["train-lens", "smollm2-135m", "--steps", "0"], "'0'"),
    (["train-lens", "smollm2-135m", "--steps", "many"], "many"),
    (["train-lens", "smollm2-135m", "--seed", "1.5"], "1.5"),
    (["train-lens", "smollm2-135m", "--device", "tpu"], "tpu"),
    (["train-lens"], "model"),
])
def test_train_lens_rejects_bad_input_with_status_2(calls, capsys, argv, named):
    assert _status(argv) == 2
    err = capsys.readouterr().err
    assert "workbench train-lens: error:" in err and named in err, err
    assert not calls


def test_train_lens_refuses_a_folder_it_may_not_replace_before_loading(calls, monkeypatch, capsys, tmp_path):
    """The real library function: the folder is claimed before the model loads (load_model fails the test)."""
    monkeypatch.setattr(cli, "build_tuned_lens", lens_train.build_tuned_lens)
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("not a lens")
    assert _status(["train-lens", "smollm2-135m", "--out", str(foreign)]) == 2
    err = capsys.readouterr().err
    assert "workbench train-lens: error:" in err and str(foreign) in err and "not written by workbench" in err


def test_build_tuned_lens_checks_everything_cheap_first(calls, tmp_path):
    with pytest.raises(ValueError, match="'tpu'"):
        lens_train.build_tuned_lens("smollm2-135m", "tpu")
    with pytest.raises(TunedLensError, match="steps"):
        lens_train.build_tuned_lens("smollm2-135m", steps=0)
    with pytest.raises(ValueError, match="no-such-model"):
        lens_train.build_tuned_lens("no-such-model")
    with pytest.raises(ValueError, match="tpu"):
        lens_train.build_tuned_lens("smollm2-135m", device="tpu")
    lens_dir = tmp_path / "lens"
    lens_dir.mkdir()
    (lens_dir / ".workbench-owner.json").write_text(json.dumps({"kind": KIND}))
    (lens_dir / "card.json").write_text("{}")
    with pytest.raises(FolderOwnershipError, match="overwrite"):
        lens_train.build_tuned_lens("smollm2-135m", out=lens_dir)
    with pytest.raises(AssertionError, match="heavy work started"):  # overwrite=True gets as far as the load
        lens_train.build_tuned_lens("smollm2-135m", out=lens_dir, overwrite=True)
    assert lens_train.lens_config("smoke", steps=5, seed=2).steps == 5


# -- train-sae -------------------------------------------------------------------------------------------------

def test_train_sae_harvest_and_train_call_the_library(calls, capsys):
    assert _status(["train-sae", "harvest"]) == 0
    assert calls["harvest_training_store"] == [((), {})]
    assert json.loads(capsys.readouterr().out.strip()) == {"store": "s", "n_tokens": 3}
    keys = sorted(sae_study.SPECS)[:2]
    assert _status(["train-sae", "train", *keys]) == 0
    assert calls["build_saes"] == [((keys,), {})]
    assert json.loads(capsys.readouterr().out.strip()) == {"sae": "k", "fvu": 0.1}


@pytest.mark.parametrize("argv, named", [
    (["train-sae", "train", "middle-topk-8x", "no-such-sae"], "no-such-sae"),
    (["train-sae", "train"], "KEY"),
    (["train-sae"], "harvest"),
    (["train-sae", "harvest", "extra"], "extra"),
    (["train-sae", "sweep"], "sweep"),
])
def test_train_sae_rejects_bad_input_with_status_2(calls, capsys, argv, named):
    assert _status(argv) == 2
    err = capsys.readouterr().err
    assert "error:" in err and named in err, err
    assert not calls


def test_build_saes_checks_every_key_before_training_any(calls):
    with pytest.raises(ValueError, match="no-such-sae"):
        sae_study.build_saes(["middle-topk-8x", "no-such-sae"])
    with pytest.raises(ValueError, match="no SAE"):
        sae_study.build_saes([])
    with pytest.raises(AssertionError, match="heavy work started"):  # a good key gets as far as the training
        next(iter(sae_study.build_saes(["middle-topk-8x"])))


# -- build-testbed ---------------------------------------------------------------------------------------------

def test_build_testbed_passes_its_options_to_the_library(calls, tmp_path):
    assert _status(["build-testbed"]) == 0
    assert calls["build_testbed"] == [(("both",), dict(n_train=testbed_model.TestbedConfig.n_train, seed=0,
                                                       out=None))]
    out = str(tmp_path / "parts")
    assert _status(["build-testbed", "--variant", VARIANTS[0], "--n-train", "16", "--seed", "4", "--out", out]) == 0
    assert calls["build_testbed"][1] == ((VARIANTS[0],), dict(n_train=16, seed=4, out=out))


@pytest.mark.parametrize("argv, named", [
    (["build-testbed", "--variant", "sepia"], "sepia"),
    (["build-testbed", "--n-train", "-3"], "-3"),
    (["build-testbed", "--n-train", "lots"], "lots"),
    (["build-testbed", "--seed", "x"], "'x'"),
    (["build-testbed", "train"], "train"),
])
def test_build_testbed_rejects_bad_input_with_status_2(calls, capsys, argv, named):
    assert _status(argv) == 2
    err = capsys.readouterr().err
    assert "error:" in err and named in err, err  # an extra word is the top-level parser's error
    assert not calls


def test_build_testbed_checks_every_variant_before_training(calls):
    with pytest.raises(ValueError, match="sepia"):
        testbed_model.build_testbed("sepia")
    with pytest.raises(ValueError, match="n_train"):
        testbed_model.build_testbed("both", n_train=0)
    with pytest.raises(ValueError, match="'biased-s2' are unknown"):  # no place in the package for seed 2
        testbed_model.build_testbed("both", seed=2)
    with pytest.raises(AssertionError, match="heavy work started"):
        next(iter(testbed_model.build_testbed(VARIANTS[0], n_train=8)))


def test_every_registered_testbed_has_its_committed_parts_and_card():
    for name, key in testbed_model.TESTBED_NAMES.items():
        variant, _, seed = key.partition("-s")
        assert key == testbed_model.parts_key(variant, int(seed or 0))
        parts, card = testbed_model.load_parts(key)  # the parts' hash is checked against the card
        assert card["name"] == name and card["config"]["variant"] == variant and card["config"]["seed"] == int(seed or 0)
        assert card["config"]["n_train"] == testbed_model.TestbedConfig.n_train and parts


# -- one program -----------------------------------------------------------------------------------------------

def test_the_separate_programs_are_gone():
    """Only ``workbench`` (``python -m workbench``) is a program: the builders have no ``main`` of their own."""
    assert not hasattr(lens_train, "main") and not hasattr(sae_study, "main") and not hasattr(testbed_model, "main")
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("workbench.testbed.__main__")


def test_python_m_workbench_exits_2_on_a_bad_value():
    out = subprocess.run([sys.executable, "-m", "workbench", "train-lens", "smollm2-135m", "--recipe", "tpu"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "invalid choice: 'tpu'" in out.stderr
