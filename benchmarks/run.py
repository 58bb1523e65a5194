"""The benchmark harness (docs/benchmarks.md): train -> calibrate on validation -> evaluate on test.

    python benchmarks/run.py --profile cpu                      # every method on both datasets
    python benchmarks/run.py --profile cpu --datasets lgg_flair --methods synomaly ddpm-gaussian

Each finished run writes ``benchmarks/results/<profile>/<dataset>/<method>.json``; runs whose file
exists are skipped, and an interrupted training resumes from its checkpoint, so the same command
continues where a killed one stopped. Model folders and evaluations go to ``benchmarks/runs/``
(not committed). ``python benchmarks/render.py`` turns the results into ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from synomaly import _atomic
from synomaly._json import json_safe
from synomaly.calibration_rules import TUNED_FIELDS, choose_row
from synomaly.methods import get_method

ROOT = Path(__file__).resolve().parent.parent
log = logging.getLogger("benchmark")

THRESHOLDS = (0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4)
# Per-volume numbers of the test evaluation (slices stacked by patient and slice number); ``dice_volume_mean`` is the 3-D Dice.
VOLUME_KEYS = ("n_volumes", "lesion_sensitivity", "lesion_sensitivity_n", "fp_lesions_per_volume", "lesion_volume_error_mean",
               "lesion_volume_abs_error_mean", "lesion_volume_unit")


@dataclass(frozen=True)
class Profile:
    """Budget shared by every method: UNet, image size, optimisation, detection batch and grid."""

    model: str
    image_size: int
    steps: int
    batch_size: int
    lr: float
    precision: str = "32"
    t: tuple[int, ...] = (100, 200, 300)
    kernel: tuple[int, ...] = (3, 5, 7)
    threshold: tuple[float, ...] = THRESHOLDS
    detect_batch: int = 32
    description: str = ""


PROFILES = {
    "cpu": Profile("small", 64, 1500, 16, 2e-4, description="64x64 (area-downsampled from 128), `small` UNet "
                   "(channels 32/64/128, attention at 16x16, 2.7 M parameters), 1500 steps at batch 16, AdamW 2e-4, "
                   "EMA 0.999, cosine T=1000, MSE loss"),
    "gpu": Profile("paper", 128, 3000, 32, 1e-4, precision="bf16", detect_batch=64,
                   description="128x128, `paper` UNet (98.6 M parameters), 3000 steps at batch 32 in bf16"),
    "smoke": Profile("tiny", 32, 20, 8, 1e-3, t=(200,), kernel=(3,), threshold=(0.2, 0.3), detect_batch=64,
                     description="tiny UNet, 20 steps: checks the harness, not the methods"),
}


@dataclass(frozen=True)
class Dataset:
    file: str
    preset: str
    level_matched: str | None = None  # key of the healthy slices' distance to the nearest tumour slice
    foreground_suffix: str | None = None  # the data's own foreground masks: key of split ``s`` is ``s + suffix``


DATASETS = {
    "lgg_flair": Dataset("lgg_flair/lgg_flair.npz", "brain-flair", level_matched="test_healthy_dist",
                         foreground_suffix="_headmask"),
    "busi": Dataset("busi/busi.npz", "ultrasound"),
}


@dataclass(frozen=True)
class Method:
    """How a method trains and detects. ``shares`` names the method whose trained model it reuses."""

    train: dict[str, Any]
    stages: tuple[int, ...] = (1,)
    stages_on: dict[str, tuple[int, ...]] = field(default_factory=dict)  # per dataset: replaces ``stages``
    preprocess: dict[str, dict[str, Any]] = field(default_factory=dict)  # per dataset: overrides of the preset's preprocessing
    train_options: dict[str, Any] = field(default_factory=dict)  # overrides of the profile's TrainConfig
    infer_preprocess: dict[str, Any] = field(default_factory=dict)  # changes a shared model's preprocessing
    ablation: bool = False  # run only when named; a row of the ablation table
    data_foreground: bool = False  # use the data set's own foreground masks (``Dataset.foreground_suffix``)
    detect: dict[str, Any] = field(default_factory=dict)
    shares: str | None = None
    t: tuple[int, ...] | None = None  # None: the profile's grid
    kernel: tuple[int, ...] | None = None
    threshold: tuple[float, ...] | None = None
    fusion: tuple[str, ...] = ("binary",)  # the multi-stage fusion modes of the grid
    note: str = ""


MULTI = (2, 3, 5)
METHODS = {
    # On busi the Dice still rises at the fifth stage, and up to 10 stages win on validation (abl-more-stages).
    "synomaly": Method({"noise": "synomaly"}, stages=MULTI, stages_on={"busi": MULTI + (7, 10)},
                       note="multi-stage masked fusion, per-image stop"),
    "synomaly-1stage": Method({}, shares="synomaly", note="one stage"),
    "ddpm-gaussian": Method({"noise": "gaussian"}, note="one stage"),
    "dae": Method({"method": "dae", "noise": "coarse"}, t=(0,), note="one forward pass (Kascenas et al.)"),
    "ddpm-simplex": Method({"noise": "simplex"}, detect={"sampler": "chain", "chain_steps": 10},
                           note="AnoDDPM reverse chain from t, 10 network evaluations"),
    "ddpm-simplex-1step": Method({}, shares="ddpm-simplex", note="one-step"),
    # AutoDDPM's map is the inpainted residual times a [0, 1] weight, so its thresholds lie below the others' grid.
    "autoddpm-ssim": Method({}, shares="ddpm-gaussian", detect={"sampler": "autoddpm", "chain_steps": 10, "inpaint_t": 50,
                            "resamplings": 4, "perceptual": "ssim", "dilation": 3}, kernel=(1, 3, 5, 7),
                            threshold=(0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3),
                            note="AutoDDPM (Bercea et al. 2023), SSIM in place of LPIPS: reverse chain from t (10 evaluations), "
                            "mask, RePaint from t = 50 with 4 resamplings (210 evaluations); map: inpainted residual x first map"),
    "ddpm-coarse": Method({"noise": "coarse"}, note="one stage"),
    "ddpm-pyramid": Method({"noise": "pyramid"}, note="one stage"),
    "supervised-unet": Method({"method": "supervised"}, t=(0,), kernel=(1, 3, 5), threshold=(0.3, 0.4, 0.5, 0.6, 0.7),
                              note="upper bound: trained on the train tumour slices and masks"),
    "ddpm-gaussian-multistage": Method({}, shares="ddpm-gaussian", stages=MULTI, note="ablation: multi-stage"),
    "vae": Method({"method": "vae"}, t=(0,), note="variational autoencoder (latent 128, MSE + 1e-3 KL): the decoded "
                  "posterior mean"),
    # The profile's steps are optimiser updates: two thirds train the WGAN-GP (5 critic updates per generator
    # update), the rest the encoder (docs/method.md §7).
    "fanogan": Method({"method": "fanogan"}, t=(0,), note="f-AnoGAN (WGAN-GP, then the izi_f encoder; latent 128): "
                      "the reconstruction G(E(x)); image score the combined residual"),
}

# The floor every method is compared with: an intensity threshold inside the foreground (Meissen et al. 2021).
# ``lgg_flair`` slices show scalp and skull, so it gets the automatic head mask; ``busi`` keeps its preset's disk.
FG = {"lgg_flair": {"foreground": "auto"}}
INTENSITY_THRESHOLDS = (0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9)
METHODS["intensity"] = Method({"method": "intensity"}, preprocess=FG, t=(0,), kernel=(1, 3, 5, 7),
                              threshold=INTENSITY_THRESHOLDS, note="intensity of the image inside the foreground "
                              "(Meissen et al.), no training: the floor")

# Ablations of the Synomaly recipe: one change each against the earlier recipe (no foreground, flips both ways;
# the committed `synomaly` rows were made with it), or against the row named in ``note``. Each row names what it keeps
# fixed, so it means the same after the presets change.
NO_FG = {"lgg_flair": {"foreground": "none"}}
BOTH_FLIPS = {"flips": "both"}
ABLATIONS = {
    "abl-earlier-recipe": Method({"noise": "synomaly"}, stages=MULTI, preprocess=NO_FG, train_options=BOTH_FLIPS,
                                 note="the recipe before these ablations: no foreground, flips both ways"),
    "abl-earlier-recipe-1stage": Method({}, shares="abl-earlier-recipe", note="`abl-earlier-recipe`, one stage"),
    "abl-foreground": Method({"noise": "synomaly"}, stages=MULTI, preprocess=FG, train_options=BOTH_FLIPS,
                             note="foreground `auto` (head mask): blobs inside it in training, map zeroed outside it"),
    "abl-foreground-erode2": Method({}, shares="abl-foreground", stages=MULTI, infer_preprocess={"foreground_erosion": 2},
                                    note="`abl-foreground`, head mask eroded by 2 px at inference"),
    "abl-foreground-erode4": Method({}, shares="abl-foreground", stages=MULTI, infer_preprocess={"foreground_erosion": 4},
                                    note="`abl-foreground`, head mask eroded by 4 px at inference"),
    "abl-foreground-erode4-1stage": Method({}, shares="abl-foreground", infer_preprocess={"foreground_erosion": 4},
                                           note="`abl-foreground-erode4`, one stage"),
    "abl-foreground-fixed-stages": Method({}, shares="abl-foreground", stages=MULTI, detect={"tol": 0.0},
                                          note="`abl-foreground` with a fixed stage count (no convergence stop)"),
    "abl-foreground-1stage": Method({}, shares="abl-foreground", note="`abl-foreground`, one stage"),
    "abl-intensity-erode2": Method({"method": "intensity"}, preprocess={"lgg_flair": {"foreground": "auto",
                                   "foreground_erosion": 2}}, t=(0,), kernel=(1, 3, 5, 7), threshold=INTENSITY_THRESHOLDS,
                                   note="`intensity`, head mask eroded by 2 px"),
    "abl-intensity-erode4": Method({"method": "intensity"}, preprocess={"lgg_flair": {"foreground": "auto",
                                   "foreground_erosion": 4}}, t=(0,), kernel=(1, 3, 5, 7), threshold=INTENSITY_THRESHOLDS,
                                   note="`intensity`, head mask eroded by 4 px"),
    "abl-intensity-headmask-erode4": Method(
        {"method": "intensity"}, preprocess={"lgg_flair": {"foreground_erosion": 4}}, data_foreground=True, t=(0,),
        kernel=(1, 3, 5, 7), threshold=INTENSITY_THRESHOLDS,
        note="`intensity` inside the data's own head masks eroded by 4 px (the floor as first measured)"),
    "abl-hflip": Method({"noise": "synomaly"}, stages=MULTI, preprocess=NO_FG, train_options={"flips": "horizontal"},
                        note="left-right flips only (images kept upright; on `lgg_flair` without a foreground)"),
    "abl-foreground-hflip": Method({"noise": "synomaly"}, stages=MULTI, preprocess=FG, train_options={"flips": "horizontal"},
                                   note="`abl-foreground` with left-right flips only"),
    "abl-foreground-hflip-erode4": Method({}, shares="abl-foreground-hflip", stages=MULTI, infer_preprocess={"foreground_erosion": 4},
                                          note="`abl-foreground-hflip`, head mask eroded by 4 px at inference"),
    "abl-foreground-hflip-erode4-1stage": Method({}, shares="abl-foreground-hflip", infer_preprocess={"foreground_erosion": 4},
                                                 note="`abl-foreground-hflip-erode4`, one stage"),
    "abl-seed1": Method({"noise": "synomaly"}, stages=MULTI, train_options={"seed": 1},
                        note="`synomaly` (the preset's recipe) with training seed 1: the seed spread"),
    "abl-seed1-1stage": Method({}, shares="abl-seed1", note="`abl-seed1`, one stage"),
    # The adopted lgg_flair point (t 100, kernel 7, threshold 0.1) and the busi point (t 300, kernel 7) lie on the grid's
    # edges, so the grid is extended past them on validation; same model, calibration only.
    "abl-grid-low": Method({}, shares="synomaly", stages=MULTI, t=(50, 100, 200), kernel=(5, 7, 9),
                           threshold=(0.05, 0.075, 0.1, 0.15, 0.2),
                           note="`synomaly` calibrated on a grid past its lower edges: t 50, kernel 9, thresholds 0.05 and 0.075"),
    "abl-both-flips": Method({"noise": "synomaly"}, stages=MULTI, train_options=BOTH_FLIPS,
                             note="flips both ways (upside-down images too), as before the `ultrasound` preset kept images upright"),
    "abl-grid-high": Method({}, shares="abl-both-flips", stages=MULTI, t=(300, 400, 500), kernel=(7, 9, 11),
                            threshold=(0.15, 0.2, 0.25, 0.3, 0.35),
                            note="`abl-both-flips` calibrated on a grid past its upper edges: t 400 and 500, kernels 9 and 11"),
    # On busi the test Dice still rises at the fifth stage (docs/benchmarks.md), so the stage cap is extended; same model.
    "abl-more-stages": Method({}, shares="synomaly", stages=(5, 7, 10),
                              note="`synomaly` calibrated with up to 10 stages (caps 5, 7, 10) instead of 2, 3, 5"),
    "abl-fusion-continuous": Method({}, shares="synomaly", stages=MULTI, fusion=("continuous",),
                                    note="`synomaly` with continuous fusion (weight: the thresholded difference, as the "
                                    "reference scripts) instead of binary"),
    "abl-fixed-range": Method({"noise": "synomaly"}, stages=MULTI, train_options=BOTH_FLIPS,
                              preprocess={"lgg_flair": {"normalization": "fixed", "foreground": "none"}},
                              note="keep the data's per-volume scale (0..255 to [-1, 1]) instead of per-slice min-max"),
    "abl-hybrid": Method({"noise": "synomaly"}, stages=MULTI, preprocess=NO_FG, train_options={"loss": "hybrid", **BOTH_FLIPS},
                         note="hybrid loss (MSE + variational bound) instead of MSE"),
    "abl-3000-steps": Method({"noise": "synomaly"}, stages=MULTI, train_options={"steps": 3000},
                             note="`synomaly` (the preset's recipe) trained for 3000 steps instead of 1500"),
    "abl-3000-steps-1stage": Method({}, shares="abl-3000-steps", note="`abl-3000-steps`, one stage"),
}
METHODS.update({name: dataclasses.replace(method, ablation=True) for name, method in ABLATIONS.items()})

# Each baseline without a foreground: only Synomaly noise uses the foreground in training, so for every other method it
# acts at inference alone, and the same trained model, calibrated and evaluated with ``foreground: none``, shows what the
# head mask adds to it (`synomaly`'s counterpart is `abl-hflip`, which is trained without one). Run on `lgg_flair`.
NO_FOREGROUND = {f"{name}-no-fg": name for name in ("ddpm-gaussian", "ddpm-gaussian-multistage", "dae", "ddpm-simplex",
                                                     "ddpm-simplex-1step", "autoddpm-ssim", "ddpm-coarse", "ddpm-pyramid",
                                                     "supervised-unet", "vae", "fanogan")}
METHODS.update({name: dataclasses.replace(METHODS[of], train={}, shares=METHODS[of].shares or of, ablation=True,
                                          infer_preprocess={**METHODS[of].infer_preprocess, "foreground": "none"},
                                          note=f"`{of}` without a foreground")
                for name, of in NO_FOREGROUND.items()})


def fewer_stages_choice(calibration: dict[str, Any]) -> dict[str, Any] | None:
    """The point and validation Dice that ``calibrate``'s default ``fewer-stages`` rule takes from the same grid."""
    if calibration["method"] != "dice-grid":
        return None
    row = choose_row(calibration["table"], "fewer-stages")
    return {**{name: row[name] for name in TUNED_FIELDS}, "validation_dice": row["dice"]}


def foreground_of(method: Method, dataset: Dataset, sources: list[str]) -> list[str] | None:
    """The data set's foreground mask sources for ``sources`` (``bundle.npz:split``) when ``method`` uses them."""
    if not (method.data_foreground and dataset.foreground_suffix):
        return None
    return [source + dataset.foreground_suffix for source in sources]


def commit() -> str:
    """The checked-out commit, with ``-dirty`` when tracked files differ from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short=12", "HEAD") or "unknown"
    return head + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, torch {torch.__version__})"


def link_model(source: Path, target: Path, preprocess: dict[str, Any] | None = None) -> None:
    """Make ``target`` a model folder with ``source``'s weights and config (hard links when possible).

    ``preprocess`` changes the linked folder's preprocessing (an inference-only ablation).
    """
    target.mkdir(parents=True, exist_ok=True)
    if preprocess:
        config = json.loads((source / "config.json").read_text())
        config["preprocess"].update(preprocess)
        _atomic.write_json(target / "config.json", config)
    for name in ("model.safetensors",) if preprocess else ("config.json", "model.safetensors"):
        (target / name).unlink(missing_ok=True)
        try:
            os.link(source / name, target / name)
        except OSError:
            shutil.copy2(source / name, target / name)


def train_model(name: str, method: Method, profile: Profile, dataset: Dataset, data: Path, folder: Path,
                device: str, dataset_name: str) -> float:
    """Train (or resume, or skip when finished) ``name``'s model; returns the total training seconds."""
    from synomaly.commands import run_train
    from synomaly.train import TrainConfig

    ledger = folder / "train_seconds.json"
    spent = json.loads(ledger.read_text())["seconds"] if ledger.exists() else 0.0
    options = {"steps": profile.steps, "batch_size": profile.batch_size, "lr": profile.lr, "precision": profile.precision,
               **method.train_options}
    config_file = folder / "model" / "config.json"
    train_method = method.train.get("method", "diffusion")
    if not get_method(train_method).trained:
        options["steps"] = 0
    if config_file.exists():
        recorded = json.loads(config_file.read_text())
        check_recipe(recorded, method, dataset, dataset_name, profile, options, config_file)
        if recorded["training"].get("final_step") == options["steps"]:
            return spent
    options["steps"] = max(options["steps"], 1)
    sources, masks = [f"{data}:train_healthy"], None
    if get_method(train_method).needs_masks:
        sources, masks = [f"{data}:train_anomalous", f"{data}:train_healthy"], [f"{data}:train_masks", "none"]
    accelerator = "gpu" if device.startswith("cuda") else "cpu"
    config = TrainConfig(**options, accelerator=accelerator, checkpoint_every=100, preview_every=500, progress=False)
    log.info("training %s (%s) for %d steps", name, train_method, config.steps)
    start = time.perf_counter()
    run_train(sources, folder / "model", preset=dataset.preset, model=profile.model, image_size=profile.image_size,
              noise={"name": method.train.get("noise")}, train_config=config, method=train_method, masks=masks,
              preprocess=method.preprocess.get(dataset_name), foreground_masks=foreground_of(method, dataset, sources),
              resume=True)
    spent += time.perf_counter() - start
    _atomic.write_json(ledger, {"seconds": spent})
    return spent


def recorded_flips(training: dict[str, Any]) -> str | None:
    """The training flips a model folder records (older folders record a bool)."""
    flips = training.get("flips")
    return {True: "both", False: "none"}.get(flips, flips)


def check_recipe(recorded: dict[str, Any], method: Method, dataset: Dataset, dataset_name: str, profile: Profile,
                 options: dict[str, Any], config_file: Path) -> None:
    """Stop when a model folder was trained with another recipe than this run's (a preset changed since).

    A finished or interrupted model is reused by name, so without this check a changed default (flips, foreground,
    intensity scaling) would silently be measured with the old model.
    """
    from synomaly.preprocess import Preprocessing, preset_flips

    pre = Preprocessing.from_preset(dataset.preset, size=profile.image_size, **(method.preprocess.get(dataset_name) or {}))
    wanted = {f"preprocess.{k}": v for k, v in json.loads(json.dumps(pre.to_dict())).items()}
    if get_method(method.train.get("method", "diffusion")).trained:
        wanted["training.flips"] = options.get("flips") or preset_flips(dataset.preset)
        wanted.update({f"training.{k}": options[k] for k in ("seed", "loss") if k in options})
    differ = []
    for key, value in wanted.items():
        section, name = key.split(".")
        have = recorded_flips(recorded.get(section, {})) if name == "flips" else recorded.get(section, {}).get(name)
        if have != value:
            differ.append(f"{key} {have!r} there, {value!r} now")
    if differ:
        raise SystemExit(f"benchmark: {config_file.parent}: trained with another recipe ({'; '.join(differ)}); remove the "
                         "folder (and the result files made with it) to train it again")


def batch1_ms(model: Path, data: Path, device: str, foreground: list[str] | None, n: int = 16) -> float:
    """Milliseconds per image of ``detect`` one image at a time (first ``n`` test tumour slices)."""
    from synomaly.commands import load_labelled
    from synomaly.pipeline import SynomalyPipeline

    pipe = SynomalyPipeline.from_pretrained(model, device=device)
    cases = load_labelled(pipe, [f"{data}:test_anomalous"], None, 2, None, foreground)
    images, fg = cases.images[:n].to(device), None if cases.foreground is None else cases.foreground[:n].to(device)
    generator = torch.Generator(device).manual_seed(0)
    pipe.detect(images[:1], generator, None if fg is None else fg[:1])  # warm-up
    _sync(device)
    start = time.perf_counter()
    for i in range(len(images)):
        pipe.detect(images[i : i + 1], generator, None if fg is None else fg[i : i + 1])
    _sync(device)
    return (time.perf_counter() - start) / len(images) * 1000


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def level_matched_auroc(per_case: list[dict[str, Any]], distances: np.ndarray, n_anomalous: int, limit: int = 3) -> float:
    """Image-level AUROC with healthy test slices restricted to those within ``limit`` slices of a tumour."""
    from synomaly.metrics import image_auroc

    scores = torch.tensor([row["score"] for row in per_case], dtype=torch.float64)
    keep = torch.cat([torch.ones(n_anomalous, dtype=torch.bool), torch.from_numpy(distances <= limit)])
    labels = torch.cat([torch.ones(n_anomalous), torch.zeros(len(distances))])
    return float(image_auroc(scores[keep], labels[keep].bool()))


UNSUPERVISED_KEYS = ("dice_mean", "dice_pooled", "iou_mean", "fpr_healthy_mean")


def unsupervised_metrics(record: dict[str, Any], folder: Path, data: Path, profile: Profile, device: str,
                         foreground: list[str] | None, scored: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Test metrics at the threshold a user without lesion masks gets: the healthy validation percentile.

    ``scored``: the test evaluation's ``aggregate_at`` rows (one-stage settings score that threshold in the same pass);
    otherwise, multi-stage, a second evaluation runs at it.
    """
    from synomaly.commands import run_evaluate

    threshold = record["calibration"]["healthy_percentile_threshold"]
    if threshold is None:
        return {"threshold": None}
    for row in scored or ():
        if row["threshold"] == threshold:
            return {"threshold": threshold, "same_pass": True, **{key: row[key] for key in UNSUPERVISED_KEYS}}
    log.info("evaluating %s at the unsupervised threshold %.3f", record["method"], threshold)
    metrics = run_evaluate(folder / "model", [f"{data}:test_anomalous", f"{data}:test_healthy"], [f"{data}:test_masks", "none"],
                           folder / "evaluation-unsupervised", detect={"threshold": threshold}, foreground_masks=foreground,
                           batch_size=profile.detect_batch, device=device, overwrite=True)["aggregate"]
    return {"threshold": threshold, **{key: metrics[key] for key in UNSUPERVISED_KEYS}}


def run_one(profile_name: str, dataset_name: str, name: str, data_root: Path, runs: Path, results: Path,
            device: str) -> Path | None:
    """Train (or reuse), calibrate and evaluate one method on one dataset; returns the result file written."""
    from synomaly.calibrate import CalibrationGrid
    from synomaly.commands import run_calibrate, run_evaluate

    out = results / profile_name / dataset_name / f"{name}.json"
    profile, dataset, method = PROFILES[profile_name], DATASETS[dataset_name], METHODS[name]
    data = data_root / dataset.file
    base = runs / profile_name / dataset_name
    if out.exists():
        log.info("%s/%s/%s: done already (%s)", profile_name, dataset_name, name, out)
        return None
    if not data.is_file():
        raise SystemExit(f"benchmark: {data}: missing (pass --data-root, the folder holding lgg_flair/ and busi/)")
    trained_by = method.shares or name
    train_seconds = train_model(trained_by, METHODS[trained_by], profile, dataset, data, base / trained_by, device,
                                dataset_name)
    model = base / name / "model"
    if method.shares:
        link_model(base / trained_by / "model", model, method.infer_preprocess)
    grid = CalibrationGrid(t=method.t or profile.t, kernel=method.kernel or profile.kernel,
                           threshold=method.threshold or profile.threshold, max_stages=method.stages_on.get(dataset_name, method.stages),
                           fusion=method.fusion)
    log.info("calibrating %s on validation", name)
    val, test = [f"{data}:val_anomalous", f"{data}:val_healthy"], [f"{data}:test_anomalous", f"{data}:test_healthy"]
    calibration = run_calibrate(model, val, masks=[f"{data}:val_masks", "none"], foreground_masks=foreground_of(method, dataset, val),
                                grid=grid, detect=method.detect, selection="best", batch_size=profile.detect_batch,
                                device=device, overwrite=True)
    log.info("evaluating %s on test", name)
    start = time.perf_counter()
    test_foreground = foreground_of(method, dataset, test)
    unsupervised = calibration["healthy_percentile_threshold"]
    one_stage = calibration["detect"]["max_stages"] == 1 and unsupervised is not None
    metrics = run_evaluate(model, test, [f"{data}:test_masks", "none"], base / name / "evaluation",
                           foreground_masks=test_foreground, batch_size=profile.detect_batch, device=device, overwrite=True,
                           also_thresholds=(unsupervised,) if one_stage else ())
    eval_seconds = time.perf_counter() - start
    agg = metrics["aggregate"]
    n_anomalous = agg["n_anomalous"]
    matched = None
    if dataset.level_matched:
        with np.load(data) as bundle:
            matched = level_matched_auroc(metrics["per_case"], bundle[dataset.level_matched], n_anomalous)
    keys = ("dice_mean", "dice_pooled", "iou_mean", "iou_pooled", "precision_mean", "recall_mean", "precision_pooled",
            "recall_pooled", "ap", "auroc_pixel", "auroc_image", "hd95_mean", "hd95_mean_n", "hd95_empty_predictions",
            "ssim_healthy", "fpr_healthy_mean", "dice_volume_mean", "n_anomalous", "n_healthy", "dice_oracle_mean",
            "dice_oracle_threshold", "dice_oracle_pooled", *VOLUME_KEYS)
    record = {
        "method": name,
        "dataset": dataset_name,
        "profile": profile_name,
        "commit": commit(),
        "device": device_name(device),
        "date": time.strftime("%Y-%m-%d"),
        "note": method.note,
        "trained_as": trained_by,
        "config": {"profile": dataclasses.asdict(profile), "train": method.train, "detect_fixed": method.detect,
                   "preprocess": method.preprocess.get(dataset_name, {}), "train_options": method.train_options,
                   "infer_preprocess": method.infer_preprocess, "data_foreground": method.data_foreground,
                   "grid": grid.to_dict(), "model": json.loads((model / "config.json").read_text())},
        "chosen": calibration["detect"],
        "calibration": {key: calibration[key] for key in ("method", "selection", "score", "healthy_percentile_threshold",
                                                          "percentile", "n_anomalous", "n_healthy")},
        # The protocol takes the best validation point; what ``synomaly calibrate``'s default rule would take instead:
        "chosen_fewer_stages": fewer_stages_choice(calibration),
        "metrics": {**{key: agg.get(key) for key in keys}, "auroc_image_level_matched": matched,
                    "dice_per_stage": agg.get("dice_per_stage")},
        "nfe_mean": agg["nfe_mean"],
        "nfe_max": agg["nfe_max"],
        "ms_per_image": agg["ms_per_image"],
        "ms_per_image_batch": profile.detect_batch,
        "ms_per_image_batch1": batch1_ms(model, data, device, test_foreground[:1] if test_foreground else None),
        "train_seconds": train_seconds,
        "evaluate_seconds": eval_seconds,
    }
    if not get_method(METHODS[trained_by].train.get("method", "diffusion")).reconstructs_image:
        record["metrics"]["ssim_healthy"] = None  # its "reconstruction" is x - p, no image
    record["unsupervised"] = unsupervised_metrics(record, base / name, data, profile, device, test_foreground,
                                                  metrics.get("aggregate_at"))
    _atomic.write_json(out, json_safe(record))
    log.info("%s/%s/%s: test Dice %.3f (validation %.3f) -> %s", profile_name, dataset_name, name,
             agg["dice_mean"], calibration["score"] or float("nan"), out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profile", required=True, choices=sorted(PROFILES))
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--methods", nargs="+", default=[m for m in METHODS if not METHODS[m].ablation],
                        choices=list(METHODS), help="methods and ablations (ablations run only when named)")
    parser.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--runs", type=Path, default=ROOT / "benchmarks" / "runs", help="model folders and evaluations")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads of torch (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from synomaly.errors import SynomalyError

    try:
        for dataset in args.datasets:
            for method in args.methods:
                run_one(args.profile, dataset, method, args.data_root, args.runs, args.results, args.device)
    except SynomalyError as error:
        print(f"benchmark: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
