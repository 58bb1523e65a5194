"""HTML report: self-contained output, metric wording, null handling, overlays, and a real browser render."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from synomaly.errors import ConfigError, InputError, OutputExistsError
from synomaly.report import PRED_COLOR, TRUTH_COLOR, build_report, overlay_rgb

N_CASES, SIZE, STAGES = 6, 32, 3
N_ANOMALOUS = 4
NOTES = "Demo on synthetic phantoms: shows the pipeline end to end, not clinical accuracy <b>unescaped?</b>"
PNG_URI = "data:image/png;base64,"


def _disk(center: tuple[float, float], radius: float) -> np.ndarray:
    yy, xx = np.mgrid[:SIZE, :SIZE]
    return (yy - center[0]) ** 2 + (xx - center[1]) ** 2 <= radius**2


def _dice(pred: np.ndarray, target: np.ndarray) -> float:
    return 2.0 * (pred & target).sum() / (pred.sum() + target.sum()) if target.any() else float("nan")


def _fake_cases(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Phantoms with a bright disk lesion; each stage's mask moves closer to it, some cases stay poor."""
    head = _disk((SIZE / 2, SIZE / 2), 0.42 * SIZE)
    stages = np.array([1, 2, 3, 3, 2, 1], dtype=np.int64)
    arrays: dict[str, list] = {key: [] for key in ("image", "target", "stage_reconstructions", "stage_masks")}
    for case in range(N_CASES):
        healthy = np.where(head, 0.1 * rng.standard_normal((SIZE, SIZE)), -1.0)
        center = rng.uniform(11, 21, size=2)
        target = _disk(center, 4.0) if case < N_ANOMALOUS else np.zeros((SIZE, SIZE), bool)
        image = np.clip(healthy + 0.8 * target, -1, 1)
        error = 1 + 3 * (case % 2)  # odd cases end far off the lesion: a spread of Dice values
        masks = [_disk(center + error * (STAGES - s), 4.0) & (case < N_ANOMALOUS or case == 4)
                 for s in range(STAGES)]
        masks = [masks[min(s, stages[case] - 1)] for s in range(STAGES)]  # past the stop: repeat the last
        recons = [np.clip(image - 0.8 * target * (s + 1) / STAGES, -1, 1) for s in range(STAGES)]
        recons = [recons[min(s, stages[case] - 1)] for s in range(STAGES)]
        for key, value in zip(arrays, (image, target, recons, masks)):
            arrays[key].append(value)
    cases = {key: np.asarray(value) for key, value in arrays.items()}
    cases["stage_reconstructions"] = cases["stage_reconstructions"].astype(np.float32)
    cases["reconstruction"] = cases["stage_reconstructions"][:, -1]
    cases["mask"] = cases["stage_masks"][:, -1]
    difference = np.abs(cases["image"] - cases["reconstruction"])
    cases["anomaly_map"] = np.maximum(difference, 0.3 * cases["mask"]).astype(np.float32)  # false positives too
    cases["image"] = cases["image"].astype(np.float32)
    cases["dice"] = np.array([_dice(m, t) for m, t in zip(cases["mask"], cases["target"])])
    cases["stages"] = stages
    cases["case_id"] = np.array([f"patient{case // 2:02d}_slice{case:03d}" for case in range(N_CASES)])
    return cases


def _fake_metrics(cases: dict[str, np.ndarray]) -> dict:
    dice = cases["dice"]
    per_case = [
        {"case_id": str(cid), "group_id": str(cid)[:9], "anomalous": bool(t.any()),
         "dice": None if np.isnan(d) else float(d), "iou": None, "precision": 0.5, "recall": 0.5, "fpr": 0.01,
         "hd95": None, "ap": 0.6, "ssim": None if t.any() else 0.91, "score": float(m.sum())}
        for cid, t, m, d in zip(cases["case_id"], cases["target"], cases["anomaly_map"], dice)
    ]
    recall = np.linspace(0, 1, 50)
    aggregate = {
        "dice_mean": float(np.nanmean(dice)), "dice_mean_n": N_ANOMALOUS, "dice_pooled": 0.5123456,
        "iou_mean": 0.41, "iou_mean_n": N_ANOMALOUS, "iou_pooled": 0.40, "precision_mean": 0.55,
        "precision_mean_n": 3, "recall_mean": 0.6, "recall_mean_n": N_ANOMALOUS, "fpr_mean": 0.002,
        "fpr_mean_n": N_ANOMALOUS, "ap": 0.63, "auroc_pixel": 0.97, "auroc_image": None, "hd95_mean": 3.25,
        "hd95_mean_n": 4, "hd95_empty_predictions": 0, "ssim_healthy": 0.91, "ssim_healthy_n": 2,
        "n_cases": N_CASES, "n_anomalous": N_ANOMALOUS, "n_healthy": N_CASES - N_ANOMALOUS, "nfe_mean": 2.0,
        "nfe_max": 3, "ms_per_image": None, "dice_per_stage": [0.31, 0.52, 0.58], "dice_volume_mean": 0.6,
        "n_volumes": 3, "n_volumes_anomalous": 2, "extra_metric": 1.5,
    }
    return {
        "aggregate": aggregate,
        "detect": {"t": 200, "max_stages": STAGES, "kernel": 5, "threshold": 0.1, "min_size": 4,
                   "fusion": "binary"},
        "curves": {"pr": {"precision": (1 - 0.4 * recall**2).tolist(), "recall": recall.tolist()},
                   "roc": {"fpr": recall.tolist(), "tpr": np.sqrt(recall).tolist()}},
        "per_case": per_case,
        "per_volume": [{"group_id": f"patient{v:02d}", "n_slices": 2, "anomalous": v < 2, "dice": 0.6}
                       for v in range(3)],
        "settings": {"ap_thresholds": None, "spacing": None, "ssim_data_range": 2.0},
    }


def write_fake_evaluation(folder: Path, seed: int = 0) -> Path:
    """An evaluation folder as ``synomaly.evaluate.write_evaluation`` writes it (metrics.json, cases.npz)."""
    folder.mkdir(parents=True, exist_ok=True)
    cases = _fake_cases(np.random.default_rng(seed))
    (folder / "metrics.json").write_text(json.dumps(_fake_metrics(cases), indent=2))
    np.savez_compressed(folder / "cases.npz", **cases)
    return folder


@pytest.fixture(scope="module")
def eval_dir(tmp_path_factory) -> Path:
    return write_fake_evaluation(tmp_path_factory.mktemp("evaluation"))


@pytest.fixture(scope="module")
def report(eval_dir) -> Path:
    model_info = {"model": {"channels": [8, 8, 8], "image_size": 32}, "noise": {"name": "synomaly", "sigma": 3.0}}
    return build_report(eval_dir, notes=NOTES, model_info=model_info)


@pytest.fixture(scope="module")
def html(report) -> str:
    return report.read_text(encoding="utf-8")


def _cases(eval_dir: Path) -> dict[str, np.ndarray]:
    with np.load(eval_dir / "cases.npz", allow_pickle=False) as archive:
        return {key: archive[key] for key in archive.files}


def _section(html: str, start: str, end: str) -> str:
    return html[html.index(f'id="{start}"'):html.index(f'id="{end}"')]


def test_default_path_and_self_contained(report, eval_dir, html):
    assert report == eval_dir / "report.html"
    assert html.startswith("<!DOCTYPE html>")
    assert 'src="http' not in html and 'href="http' not in html
    assert "<link" not in html and "<script" not in html and "@import" not in html and "url(" not in html
    sources = re.findall(r'src="([^"]*)"', html)
    # curves, 6 case rows, 3 stage strips
    assert len(sources) == 1 + N_CASES + 3
    for source in sources:
        assert source.startswith(PNG_URI)
        assert base64.b64decode(source[len(PNG_URI):]).startswith(b"\x89PNG\r\n\x1a\n")
    assert len(html) < 3_000_000


def test_contents(html, eval_dir):
    for text in ("Dice", "IoU", "AP", "AUROC", "HD95", "SSIM", "Network evaluations",
                 "mean over 4 anomalous slices", "pooled over all pixels of all 6 slices",
                 "pixel level on the raw anomaly map", "with a non-empty prediction (0 empty)",
                 "mean over 2 healthy slices", "Worst cases", "Best cases", "Healthy cases",
                 "Stage by stage", "Detection settings", "fusion", "noise.sigma", "8, 8, 8"):
        assert text in html, text
    for case_id in _cases(eval_dir)["case_id"]:
        assert str(case_id) in html
    assert "Demo on synthetic phantoms" in html and "&lt;b&gt;unescaped?&lt;/b&gt;" in html
    assert "0.512" in html and 'title="0.5123456"' in html  # shown rounded, exact value kept
    assert re.search(r'id="metric-extra_metric".*?1\.500', html, re.S)


@pytest.mark.parametrize("key", ["auroc_image", "ms_per_image"])
def test_null_metric_shows_na(html, key):
    row = re.search(rf'<tr id="metric-{key}">(.*?)</tr>', html, re.S)
    assert row is not None and '<td class="num" title="null">n/a</td>' in row.group(1)


def test_worst_and_best_sections(html, eval_dir):
    cases = _cases(eval_dir)
    order = np.argsort(cases["dice"][:N_ANOMALOUS])
    worst, best = _section(html, "worst", "best"), _section(html, "best", "healthy")
    assert str(cases["case_id"][order[0]]) in worst and str(cases["case_id"][order[0]]) not in best
    assert str(cases["case_id"][order[-1]]) in best and str(cases["case_id"][order[-1]]) not in worst
    healthy = _section(html, "healthy", "stages")
    assert all(str(case_id) in healthy for case_id in cases["case_id"][N_ANOMALOUS:])
    assert "stages run: 3 of 3" in html


def test_overwrite_guard(report, eval_dir, tmp_path):
    with pytest.raises(OutputExistsError):
        build_report(eval_dir)
    other = build_report(eval_dir, tmp_path / "sub" / "r.html", title="Second", max_cases=1)
    assert other.is_file() and "<title>Second</title>" in other.read_text()
    assert build_report(eval_dir, other, overwrite=True, title="Third") == other
    assert "<title>Third</title>" in other.read_text()
    assert not list(other.parent.glob(".*tmp*"))  # the atomic write left no temporary file


def test_optional_parts_missing(eval_dir, tmp_path):
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    for key in ("curves", "per_volume", "settings", "detect"):
        del metrics[key]
    del metrics["aggregate"]["dice_per_stage"]
    metrics["aggregate"]["hd95_empty_predictions"] = None
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    cases = {key: value for key, value in _cases(eval_dir).items()
             if key not in ("stage_reconstructions", "stage_masks", "stages", "dice")}
    np.savez(tmp_path / "cases.npz", **cases)
    html = build_report(tmp_path).read_text()
    assert "No curves recorded" in html and "no per-stage reconstructions" in html
    assert "(n/a empty)" in html and "Dice 0." in html  # Dice recomputed from mask and target


def test_bad_inputs(eval_dir, tmp_path):
    with pytest.raises(InputError, match="metrics.json"):
        build_report(tmp_path)
    with pytest.raises(InputError, match="not a folder"):
        build_report(tmp_path / "absent")
    with pytest.raises(ConfigError, match="max_cases"):
        build_report(eval_dir, tmp_path / "r.html", max_cases=0)
    (tmp_path / "metrics.json").write_text(json.dumps({"aggregate": {}}))
    np.savez(tmp_path / "cases.npz", image=np.zeros((2, 4, 4)))
    with pytest.raises(InputError, match="lacks the arrays"):
        build_report(tmp_path)


def test_overlay_rgb_colours():
    image = np.zeros((12, 12), np.float32)  # mid gray on the [-1, 1] scale
    mask = np.zeros((12, 12), bool)
    mask[1:5, 1:5] = True
    target = np.zeros((12, 12), bool)
    target[4:10, 4:10] = True
    rgb = overlay_rgb(image, mask, target)
    assert rgb.shape == (12, 12, 3) and rgb.dtype == np.uint8
    gray = rgb[11, 0]
    assert gray[0] == gray[1] == gray[2] == 128
    outline = target.copy()
    outline[5:9, 5:9] = False
    assert (rgb[outline] == TRUTH_COLOR).all()  # including where it overlaps the fill, at (4, 4)
    fill = mask & ~target
    red, green = rgb[fill][:, 0].astype(int), rgb[fill][:, 1].astype(int)
    assert (red > 128).all() and (green < 128).all() and (red - green > 60).all()
    untouched = ~mask & ~target
    assert (rgb[untouched] == 128).all()
    assert (rgb[5:9, 5:9] == 128).all()  # inside the truth, no prediction: image shows through
    assert np.abs(rgb[1, 1].astype(int) - np.array(PRED_COLOR)).max() < 120


def test_overlay_rgb_range_and_shape_check():
    image = np.array([[-2.0, -1.0], [1.0, 3.0]])
    empty = np.zeros((2, 2), bool)
    assert overlay_rgb(image, empty, empty)[..., 0].tolist() == [[0, 0], [255, 255]]
    with pytest.raises(ValueError, match="one 2-D shape"):
        overlay_rgb(image, np.zeros((3, 2), bool), empty)


def test_screenshot_not_blank(report, tmp_path):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("headless Chromium not installed (Debian package `chromium`); cannot render the report")
    from PIL import Image

    shot = tmp_path / "shot.png"
    command = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,2000", f"--screenshot={shot}",
               report.resolve().as_uri()]
    subprocess.run(command, capture_output=True, timeout=60, check=False)
    assert shot.is_file(), "Chromium wrote no screenshot"
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[:2] == (2000, 1200)
    assert pixels.std() > 20
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 500


def test_overlay_rgb_outline_width():
    target = np.zeros((12, 12), bool)
    target[2:10, 2:10] = True
    empty = np.zeros_like(target)
    coloured = (overlay_rgb(np.zeros((12, 12)), empty, target, outline_width=2) == TRUTH_COLOR).all(axis=-1)
    ring = target.copy()
    ring[4:8, 4:8] = False
    assert (coloured == ring).all()


def test_foreground_is_outlined_where_it_leaves_pixels_out(eval_dir, tmp_path):
    (tmp_path / "metrics.json").write_text((eval_dir / "metrics.json").read_text())
    cases = _cases(eval_dir)
    np.savez(tmp_path / "cases.npz", **cases, foreground=np.ones(cases["image"].shape, dtype=bool))
    plain = build_report(tmp_path).read_text()
    assert "the map counts only inside it" not in plain  # a foreground of every pixel is not drawn
    head = np.stack([_disk((SIZE / 2, SIZE / 2), 0.42 * SIZE)] * len(cases["image"]))
    np.savez(tmp_path / "cases.npz", **cases, foreground=head)
    outlined = build_report(tmp_path, overwrite=True).read_text()
    assert "the map counts only inside it" in outlined
    figures = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", outlined)
    assert figures != re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", plain)  # the outline is drawn


def test_report_of_an_evaluate_folder_shows_its_model_and_data_and_warns_at_chance(eval_dir, tmp_path):
    from synomaly.config import PipelineConfig, model_preset

    metrics = json.loads((eval_dir / "metrics.json").read_text())
    config = PipelineConfig(model=model_preset("tiny"), training={"final_step": 30, "images": 12}).to_dict()
    metrics["model"] = {"folder": "runs/m", "config": config}
    metrics["data"] = {"images": ["v.npz:val"], "masks": ["v.npz:masks"], "foreground masks": None}
    metrics["aggregate"]["auroc_pixel"] = 0.52
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    shutil.copy(eval_dir / "cases.npz", tmp_path / "cases.npz")
    html = build_report(tmp_path, notes="Run `synomaly demo` first; a lone ` stays.").read_text()
    setup = _section(html, "setup", "metrics") if 'id="metrics"' in html else html
    assert "runs/m" in setup and "v.npz:val" in setup and "8, 8, 8" in setup and "30" in setup
    assert "Pixel AUROC 0.520: the anomaly map ranks lesion pixels no better than chance" in html
    assert "<code>synomaly demo</code>" in html and "a lone ` stays." in html
    metrics["aggregate"]["auroc_pixel"] = 0.26
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    assert "Pixel AUROC 0.260: the anomaly map scores lesion pixels lower" in build_report(tmp_path, overwrite=True).read_text()
    metrics["aggregate"]["auroc_pixel"] = 0.91
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    assert "no better than chance" not in build_report(tmp_path, overwrite=True).read_text()
