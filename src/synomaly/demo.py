"""The built-in demo: the whole method on real anatomy, offline, in a few minutes on a laptop CPU.

Healthy images are axial slices of the MNI152 2009a T1 template that ships inside the nilearn
wheel (a healthy average brain). Anomalies are synthetic: smooth dark (T1-hypointense) blobs
inserted into white matter of held-out slices. The demo trains a small model on the healthy slices, calibrates
the detection settings on validation slices, evaluates on test slices and writes an HTML report.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from torch import Tensor

from synomaly.errors import SynomalyError
from synomaly.preprocess import Preprocessing

log = logging.getLogger(__name__)

TEMPLATE = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
WHITE_MATTER = "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz"
AXIAL_RANGE = (40, 140)  # template slices with a full brain cross-section
VOLUME_ID = "mni152"  # the volume id of the test slices in the evaluation

NOTES = (
    "What this demo shows: the complete Synomaly method (training on healthy images with Synomaly noise, "
    "multi-stage detection with masked fusion, settings calibrated on validation slices, evaluation on "
    "test slices) on real brain anatomy: axial slices of the MNI152 2009a T1 template shipped with nilearn. "
    "What it does not show: performance on real lesions or on real patients. The template is one healthy "
    "average brain, so training, validation and test slices come from the same brain (interleaved levels, "
    "4 mm apart), and every anomaly is a synthetic dark (T1-hypointense) blob inserted into white matter. Use "
    "`synomaly evaluate` on real data with expert masks for clinical claims."
)


def template_path(name: str = TEMPLATE) -> Path:
    """Path of a file of nilearn's bundled MNI152 data (no download, no nilearn import)."""
    try:
        path = Path(str(resources.files("nilearn") / "datasets" / "data" / name))
    except ModuleNotFoundError:
        raise SynomalyError("the demo needs nilearn, which ships the MNI152 template: pip install nilearn") from None
    if not path.is_file():
        raise SynomalyError(f"{path}: not found in the installed nilearn package")
    return path


@dataclass
class DemoData:
    """Model-space tensors of the demo splits."""

    train: Tensor
    val_images: Tensor
    val_masks: Tensor
    test_images: Tensor
    test_masks: Tensor
    test_ids: list[str]
    foreground: dict[str, Tensor]
    test_slices: list[int]  # the template's axial slice number of each test slice: together one volume


def insert_blobs(images: Tensor, region: Tensor, within: Tensor, generator: torch.Generator, radius=(2.5, 5.0),
                 intensity=(-0.8, -0.5)) -> tuple[Tensor, Tensor]:
    """Add one smooth elliptical blob per image (dark by default, like T1-hypointense lesions),
    centred on a random pixel of ``region`` and cut to ``within`` (the head)."""
    from synomaly._filters import gaussian_blur

    n, _, h, w = images.shape
    weights = region.flatten(1).float() + 1e-6
    centre = torch.multinomial(weights, 1, generator=generator)[:, 0]
    cy, cx = (centre // w).float().reshape(-1, 1, 1, 1), (centre % w).float().reshape(-1, 1, 1, 1)
    ry, rx = (radius[0] + (radius[1] - radius[0]) * torch.rand(2, n, 1, 1, 1, generator=generator))
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    blob = ((((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2) <= 1.0) & within
    amplitude = intensity[0] + (intensity[1] - intensity[0]) * torch.rand(n, 1, 1, 1, generator=generator)
    lesioned = (images + amplitude * gaussian_blur(blob.float(), 0.7)).clamp(-1, 1)
    return lesioned, blob


def demo_data(size: int = 64, seed: int = 0) -> DemoData:
    """Split the template's axial slices: 2 of every 4 train, 1 validation, 1 test; add blobs."""
    from synomaly.io import read_images

    pre = Preprocessing(size=size, fit="letterbox", foreground="auto")
    raw, _ = read_images(template_path(), slice_axis=2, slice_range=AXIAL_RANGE)
    wm_raw, _ = read_images(template_path(WHITE_MATTER), slice_axis=2, slice_range=AXIAL_RANGE)
    images_np, foreground_np, _ = pre.apply(raw)
    wm_np = Preprocessing(size=size, fit="letterbox", foreground="given").apply(raw, region=wm_raw > 0.6)[1]
    images, foreground, wm = (torch.from_numpy(a) for a in (images_np, foreground_np, wm_np))
    z = torch.arange(len(images))
    g = torch.Generator().manual_seed(seed)
    split = {name: (z % 4 == r) for name, r in (("val", 1), ("test", 3))}
    train = images[(z % 4 == 0) | (z % 4 == 2)]
    out = {}
    for name, sel in split.items():
        x, region = images[sel], wm[sel]
        lesioned, blob = insert_blobs(x, region, foreground[sel], g)
        half = torch.arange(len(x)) % 2 == 1  # every other slice stays healthy
        out[name] = (torch.where(half[:, None, None, None], lesioned, x), blob & half[:, None, None, None])
    numbers = [int(k) + AXIAL_RANGE[0] for k in z[split["test"]]]
    return DemoData(train, *out["val"], *out["test"], [f"z{k:03d}" for k in numbers],
                    {k: foreground[v] for k, v in split.items()}, numbers)


DEMO_SIZE = 64
DEMO_NOISE = {"name": "synomaly", "sigma": 1.5, "threshold": 175.0, "offset": 0.5, "direction": [-1]}


def demo_model_config():
    """A 0.64 M-parameter UNet at 64x64 (no attention): small enough to ship and to train on a CPU."""
    from synomaly.config import model_preset

    return model_preset("small", channels=(16, 32, 64), attention_levels=(False, False, False),
                        norm_num_groups=16, image_size=DEMO_SIZE)


def train_demo_model(output_dir: str | Path, steps: int = 4000, seed: int = 0, overwrite: bool = False,
                     resume: bool = False, accelerator: str = "auto") -> Path:
    """Train the demo model on the template's healthy training slices (the shipped weights come from here)."""
    from synomaly.config import DetectConfig
    from synomaly.train import TrainConfig, train

    data = demo_data(DEMO_SIZE, seed)
    config = TrainConfig(steps=steps, batch_size=16, lr=1e-3, ema_decay=0.995, checkpoint_every=200,
                         preview_every=500, seed=seed, accelerator=accelerator, log_every=20)
    preprocess = Preprocessing(size=DEMO_SIZE, fit="letterbox", foreground="auto").to_dict()
    detect = DetectConfig(t=200, kernel=5, threshold=0.2, min_size=8)
    return train(data.train, output_dir, model=demo_model_config(), noise=DEMO_NOISE, train_config=config,
                 detect=detect, preprocess=preprocess, resume=resume, overwrite=overwrite)


def model_summary(pipe) -> dict:
    """The few facts about the model a reader of the report needs."""
    from synomaly.model import count_parameters
    from synomaly.report_text import model_facts

    return {"parameters": f"{count_parameters(pipe.unet):,}", **model_facts(pipe.config.to_dict())}


def shipped_model() -> Path:
    """The demo model folder shipped inside the package (trained by ``train_demo_model``)."""
    return Path(str(resources.files("synomaly") / "assets" / "demo_model"))


def run_demo(output: str | Path = "synomaly-demo", *, train_steps: int = 0, device: str = "auto",
             batch_size: int = 32, seed: int = 0, overwrite: bool = False) -> Path:
    """Calibrate, evaluate and report on the template with synthetic lesions; returns the report path.

    Args:
        output: Demo folder (model, evaluation, report.html).
        train_steps: Train the model from scratch for this many steps; 0 copies the shipped model.
        device: ``auto``, ``cpu`` or ``cuda``.
        batch_size: Images per network evaluation batch.
        seed: Seed of the synthetic lesions and the noise.
        overwrite: Replace an earlier demo in ``output``.
    """
    import shutil

    from synomaly.calibrate import CalibrationGrid, calibrate, write_thresholds
    from synomaly.commands import resolve_device, show_progress
    from synomaly.errors import OutputExistsError
    from synomaly.evaluate import evaluate, write_evaluation
    from synomaly.pipeline import SynomalyPipeline
    from synomaly.report import build_report

    output, start = Path(output), time.perf_counter()
    report = output / "report.html"
    model_dir = output / "model"
    if not overwrite:
        for existing in (report, model_dir, output / "evaluation"):
            if existing.exists():
                raise OutputExistsError(existing, "pass --overwrite to replace the earlier demo, or choose another --output")
    device = resolve_device(device)
    if train_steps:
        train_demo_model(model_dir, steps=train_steps, seed=seed, overwrite=True,
                         accelerator="gpu" if device.startswith("cuda") else "cpu")
    else:
        model_dir.mkdir(parents=True, exist_ok=True)
        for name in ("config.json", "model.safetensors"):
            shutil.copyfile(shipped_model() / name, model_dir / name)
    data = demo_data(DEMO_SIZE, seed)
    pipe = SynomalyPipeline.from_pretrained(model_dir, device=device)
    log.info("calibrating on %d validation slices", len(data.val_images))
    result = calibrate(pipe, data.val_images, data.val_masks, foreground=data.foreground["val"],
                       grid=CalibrationGrid(t=(100, 200, 300), kernel=(3, 5), threshold=(0.1, 0.15, 0.2, 0.25, 0.3)),
                       batch_size=batch_size, seed=seed, progress=show_progress())
    write_thresholds(model_dir, result, overwrite=True)
    pipe = SynomalyPipeline.from_pretrained(model_dir, device=device)
    log.info("evaluating on %d test slices with %s", len(data.test_images), result.detect)
    # The test slices are every fourth axial slice of one template: one volume, which the report's viewer shows.
    evaluation = evaluate(pipe, data.test_images, data.test_masks, case_ids=data.test_ids,
                          group_ids=[VOLUME_ID] * len(data.test_ids), slice_numbers=data.test_slices,
                          foreground=data.foreground["test"], batch_size=batch_size, seed=seed, progress=show_progress())
    write_evaluation(evaluation, output / "evaluation", overwrite=True)
    seconds = time.perf_counter() - start
    notes = f"{NOTES} This run took {seconds:.0f} s on {device}" + (f", {train_steps} training steps included." if train_steps else
                                                                    " (shipped model; add --train-steps N to train it here).")
    best = result.best
    if best is not None and best["max_stages"] != result.detect["max_stages"]:
        notes += (f" Calibration chose {result.detect['max_stages']} stage(s) at validation Dice {result.score:.3f}, within "
                  f"one standard error ({best['dice_se']:.3f}, {best['n']} slices) of the best point's {best['dice']:.3f} "
                  f"at {best['max_stages']} stages; fewer stages cost less.")
    path = build_report(output / "evaluation", report, title="Synomaly demo: MNI152 brain template with synthetic lesions",
                        notes=notes, model_info=model_summary(pipe), overwrite=overwrite)
    log.info("demo report: %s (%.0f s)", path, seconds)
    return path
