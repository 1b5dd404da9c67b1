"""Artifact folders (workbench.io.artifact): one claim / stage / card-last / swap scheme, one card reader, one error
type; the committed probes, tuned lens and SAEs still read back by it; doctor iterates the registered kinds."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import workbench.io.artifact as art
from workbench.batch.doctor import doctor
from workbench.io.artifact import ArtifactError, ArtifactKind, read_artifact, read_card, write_artifact
from workbench.io.atomic import sha256_file
from workbench.io.owned import OWNER_FILE, FolderOwnershipError
from workbench.io.paths import repo_root
from workbench.methods.probes.base import PROBE_KIND, load_probe, save_probe
from workbench.methods.probes.linear import RidgeProbe
from workbench.methods.sae.handle import SAE_KIND, SAEError
from workbench.methods.tuned_lens import LENS_KIND, TunedLens, TunedLensError, load_tuned_lens, save_tuned_lens

TOY = ArtifactKind("toy", card_file="toy_card.json", signature=("toy.bin",), required=("toy.bin",), label="toy")


@pytest.fixture
def toy_kind(monkeypatch):
    monkeypatch.setitem(art.KINDS, TOY.name, TOY)
    return TOY


def test_write_then_read_back(tmp_path, toy_kind):
    folder = tmp_path / "a" / "toy"
    card = write_artifact(folder, toy_kind, {"note": "x"}, files={"toy.bin": b"\x00\x01", "extra.txt": b"hi"},
                          fill=lambda d: (d / "filled.txt").write_text("filled"))
    assert card["files"] == {n: sha256_file(folder / n) for n in ("toy.bin", "extra.txt", "filled.txt")}
    assert card["versions"]["workbench"] and card["created_at"] and card["note"] == "x"
    assert sorted(p.name for p in folder.iterdir()) == [OWNER_FILE, "extra.txt", "filled.txt", "toy.bin",
                                                        "toy_card.json"]
    assert read_artifact(folder, toy_kind) == card == read_card(folder / "toy_card.json")
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".tmp-")]  # staging renamed into place
    assert art.kind_of(folder) is toy_kind
    assert all(os.stat(p).st_mode & 0o044 == 0o044 for p in folder.iterdir())  # the usual permissions
    # replaced whole, only when asked
    with pytest.raises(FolderOwnershipError, match="overwrite=True"):
        write_artifact(folder, toy_kind, {}, files={"toy.bin": b"2"})
    write_artifact(folder, toy_kind, {}, files={"toy.bin": b"2"}, overwrite=True)
    assert sorted(p.name for p in folder.iterdir()) == [OWNER_FILE, "toy.bin", "toy_card.json"]


def test_a_failed_write_leaves_the_old_folder_and_no_staging(tmp_path, toy_kind):
    folder = tmp_path / "toy"
    write_artifact(folder, toy_kind, {"v": 1}, files={"toy.bin": b"1"})

    def boom(d):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_artifact(folder, toy_kind, {"v": 2}, files={"toy.bin": b"2"}, fill=boom, overwrite=True)
    assert read_artifact(folder, toy_kind)["v"] == 1 and (folder / "toy.bin").read_bytes() == b"1"
    assert [p.name for p in tmp_path.iterdir()] == ["toy"]


def test_foreign_folders_are_refused_untouched(tmp_path, toy_kind):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "ideas.md").write_text("keep me")
    with pytest.raises(FolderOwnershipError, match="not written by workbench"):
        write_artifact(notes, toy_kind, {}, files={"toy.bin": b"1"}, overwrite=True)
    assert [p.name for p in notes.iterdir()] == ["ideas.md"]
    probe_like = tmp_path / "p"
    write_artifact(probe_like, toy_kind, {}, files={"toy.bin": b"1"})
    with pytest.raises(FolderOwnershipError, match="holds a workbench toy"):
        write_artifact(probe_like, PROBE_KIND, {}, files={"probe.safetensors": b""}, overwrite=True)
    with pytest.raises(ValueError, match="plain file name"):
        write_artifact(tmp_path / "q", toy_kind, {}, files={"../escape": b""})


@pytest.mark.parametrize("content, match", [
    ("{not json", "toy_card.json is not valid JSON"),
    ("[1, 2]", "holds a JSON list, not an object"),
    (b"\xff\xfe", "is not valid JSON"),
    (json.dumps({"files": {}}), "records no sha256 of \\['toy.bin'\\]"),
    (json.dumps({"files": {"toy.bin": 5}}), "records no sha256 of \\['toy.bin'\\]"),
    (json.dumps({"files": {"toy.bin": "0" * 64, "../etc/passwd": "0" * 64}}), "must be a file name inside"),
    (json.dumps({"files": {"toy.bin": "0" * 64, "/etc/passwd": "0" * 64}}), "must be a file name inside"),
    (json.dumps({"files": {"toy.bin": "0" * 64}}), "toy.bin: sha256 .* but the record says 000000000000"),
])
def test_hostile_cards_are_one_error_type(tmp_path, toy_kind, content, match):
    folder = tmp_path / "toy"
    write_artifact(folder, toy_kind, {}, files={"toy.bin": b"1"})
    card = folder / "toy_card.json"
    card.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ArtifactError, match=match):
        read_artifact(folder, toy_kind)
    with pytest.raises(SAEError, match=match):  # the caller's own subclass, when it names one
        read_artifact(folder, toy_kind, error=SAEError)


def test_flipped_bytes_and_missing_files(tmp_path, toy_kind):
    folder = tmp_path / "toy"
    write_artifact(folder, toy_kind, {}, files={"toy.bin": b"abcdef"})
    (folder / "toy.bin").write_bytes(b"abcdeF")
    with pytest.raises(ArtifactError, match="toy.bin: sha256"):
        read_artifact(folder, toy_kind)
    (folder / "toy.bin").unlink()
    with pytest.raises(ArtifactError, match="toy.bin: missing"):
        read_artifact(folder, toy_kind)
    with pytest.raises(ArtifactError, match="no toy folder"):
        read_artifact(tmp_path / "nothing", toy_kind)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match="no toy_card.json in"):
        read_artifact(tmp_path / "empty", toy_kind)


def test_kind_specific_errors_are_artifact_errors():
    assert issubclass(SAEError, ArtifactError) and issubclass(TunedLensError, ArtifactError)
    assert issubclass(ArtifactError, ValueError)
    assert {PROBE_KIND.name, SAE_KIND.name, LENS_KIND.name} <= set(art.KINDS)


def test_the_committed_artifacts_read_back_unchanged():
    """The probes, the tuned lens and the SAEs committed before io.artifact existed: their cards' recorded sha256
    still verify (full re-hash), with no file rewritten."""
    folders = {p.parent for d in ("probes", "saes") for p in (repo_root() / d).rglob("*.json")
               if not p.name.startswith(".")}
    found = {}
    for folder in sorted(folders):
        kind = art.kind_of(folder)
        if kind is None:
            continue
        before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
        card = read_artifact(folder, kind, full=True)
        assert card and art.recorded_files(kind, card)
        assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before
        found[kind.name] = found.get(kind.name, 0) + 1
    assert found.get("probe", 0) >= 10 and found.get("sae", 0) >= 1 and found.get("tuned-lens", 0) == 1


def test_doctor_iterates_the_registered_kinds(tmp_path, toy_kind):
    good, bad = tmp_path / "good", tmp_path / "bad"
    for f in (good, bad):
        write_artifact(f, toy_kind, {}, files={"toy.bin": b"1"})
    (bad / "toy.bin").write_bytes(b"2")
    legacy = tmp_path / "legacy"  # no owner marker: recognised by its signature files
    write_artifact(legacy, toy_kind, {}, files={"toy.bin": b"1"})
    (legacy / OWNER_FILE).unlink()
    findings = {f.path.name: f for f in doctor([tmp_path])}
    assert findings["good"].kind == "toy" and findings["good"].problem is None
    assert findings["legacy"].kind == "toy" and findings["legacy"].problem is None
    assert "toy.bin: sha256" in findings["bad"].problem
    os.chmod(good / "toy.bin", 0o600)
    assert "mode 0600" in {f.path.name: f for f in doctor([tmp_path])}["good"].problem


def test_probe_and_tuned_lens_cards_keep_their_old_keys_and_gain_files(tmp_path):
    probe = RidgeProbe(alpha=1.0).fit(np.random.default_rng(0).normal(size=(20, 4)), np.arange(20.0))
    folder = save_probe(probe, tmp_path / "p", model={"name": "m", "weights_hash": "0" * 64}, site="s", layer=1,
                        task="t", generator_params=None, seed=0, metrics={})
    card = read_card(folder / "card.json")
    assert card["files"] == {"probe.safetensors": card["weights_sha256"]} == {
        "probe.safetensors": sha256_file(folder / "probe.safetensors")}
    assert load_probe(folder).card == card and art.kind_of(folder) is PROBE_KIND
    lens = TunedLens(2, 8, model={"name": "m", "weights_sha256": "0" * 64})
    lf = save_tuned_lens(lens, tmp_path / "lens")
    lcard = read_card(lf / "card.json")
    assert lcard["files"]["translators.safetensors"] == lcard["weights_sha256"] and "cfg.json" in lcard["files"]
    assert load_tuned_lens(lf).card == lcard and art.kind_of(lf) is LENS_KIND
