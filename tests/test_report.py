"""HTML report: self-contained output, metric wording, null handling, overlays, and a real browser render."""

from __future__ import annotations

import base64
import io
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


VOLUME_SLICES = 12
LESION_SLICES = (3, 8)  # the reference lesion spans these slices of the anomalous volume (end exclusive)
FALSE_POSITIVE = 10  # the slice of the small predicted lesion that touches no reference


def _fake_volumes(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Two volumes as ``volumes.npz`` holds them: one with a spherical lesion (predicted a little off,
    plus a small false positive on one slice), one without a lesion; slices numbered from 20."""
    yy, xx = np.mgrid[:SIZE, :SIZE]
    head = _disk((SIZE / 2, SIZE / 2), 0.42 * SIZE)
    z = np.arange(VOLUME_SLICES)[:, None, None]
    radius2 = np.clip(16.0 - 4.0 * (z - 5.0) ** 2, 0.0, None)  # a ball: widest on slice 5, on slices 3 to 7
    target = ((yy - 12) ** 2 + (xx - 18) ** 2 < radius2) & (z >= LESION_SLICES[0]) & (z < LESION_SLICES[1])
    predicted = ((yy - 13) ** 2 + (xx - 18) ** 2 < radius2) & (z >= LESION_SLICES[0]) & (z < LESION_SLICES[1])
    predicted[FALSE_POSITIVE, 22:24, 8:10] = True
    anatomy = np.where(head, 0.2 * np.cos(xx / 3.0) * np.sin(yy / 4.0 + z), -1.0)  # every slice looks different
    image = np.concatenate([np.clip(anatomy + 0.9 * target, -1, 1), anatomy])
    reconstruction = np.concatenate([anatomy, anatomy]) + 0.02 * rng.standard_normal(image.shape)
    mask = np.concatenate([predicted, np.zeros_like(predicted)])
    return {
        "volume_id": np.array(["patient00", "patient02"]),
        "volume": np.repeat([0, 1], VOLUME_SLICES),
        "slice": np.tile(np.arange(20, 20 + VOLUME_SLICES), 2),
        "case_id": np.array([f"vol{v}[{k}]" for v in range(2) for k in range(VOLUME_SLICES)]),
        "image": image.astype(np.float32),
        "reconstruction": reconstruction.astype(np.float32),
        "anomaly_map": np.abs(image - reconstruction).astype(np.float32),
        "mask": mask,
        "target": np.concatenate([target, np.zeros_like(target)]),
        "foreground": np.broadcast_to(head, image.shape).copy(),
    }


def write_fake_evaluation(folder: Path, seed: int = 0, volumes: bool = True) -> Path:
    """An evaluation folder as ``synomaly.evaluate.write_evaluation`` writes it (metrics.json, cases.npz,
    volumes.npz)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    cases = _fake_cases(rng)
    (folder / "metrics.json").write_text(json.dumps(_fake_metrics(cases), indent=2))
    np.savez_compressed(folder / "cases.npz", **cases)
    if volumes:
        np.savez_compressed(folder / "volumes.npz", **_fake_volumes(rng))
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
    assert "<link" not in html and "@import" not in html and "url(" not in html and "fetch(" not in html
    assert re.findall(r"<script[^>]*>", html) == ['<script type="application/json" class="viewer-data">'] * 2 + ["<script>"]
    sources = re.findall(r'src="([^"]*)"', html)
    # curves, 6 case rows, 3 stage strips; per volume its colour bar and 7 layer sprites
    assert len(sources) == 1 + N_CASES + 3 + 2 * (1 + 7)
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


# ---------------------------------------------------------------- the volume viewer and the heat scale


def _viewer(html: str, volume_id: str) -> str:
    start = html.index(f'aria-label="volume {volume_id}"')
    return html[start : html.index("</section>", start)]


def _volumes(eval_dir: Path) -> dict[str, np.ndarray]:
    with np.load(eval_dir / "volumes.npz", allow_pickle=False) as archive:
        return {key: archive[key] for key in archive.files}


def test_viewer_lists_the_3d_lesions_and_opens_on_the_largest_reference_slice(html, eval_dir):
    volumes = _volumes(eval_dir)
    sick = _viewer(html, "patient00")
    rows = re.findall(r'<tr data-slice="(\d+)" data-first="(\d+)" data-last="(\d+)".*?>(.*?)</tr>', sick, re.S)
    # The ball is predicted on slices 4 to 6 (numbered 24 to 26): one 3-D lesion; the false positive: 4 px on slice 10.
    ball = int(volumes["mask"][:VOLUME_SLICES].sum()) - 4
    cells = [re.findall(r"<td[^>]*>(.*?)</td>", row[3]) for row in rows]
    assert [row[:3] for row in rows] == [("5", "4", "6"), (str(FALSE_POSITIVE),) * 3]
    assert [c[:4] for c in cells] == [["1", "24\u201326", "25", str(ball)], ["2", "30", "30", "4"]]
    assert 'type="range" min="0" max="11" value="5"' in sick  # the slice with the most reference pixels
    mask, target = volumes["mask"][:VOLUME_SLICES], volumes["target"][:VOLUME_SLICES]
    dice = 2 * (mask & target).sum() / (mask.sum() + target.sum())
    assert f"predicted {int(mask.sum())} px, 2 lesions; Dice {dice:.3f}" in sick
    data = json.loads(re.search(r'class="viewer-data">(.*?)</script>', sick, re.S).group(1))
    assert data["numbers"] == list(range(20, 32)) and data["cols"] == 4 and data["height"] == SIZE
    assert data["reference"] == target.sum(axis=(1, 2)).tolist()
    healthy = _viewer(html, "patient02")
    assert "no reference lesion" in healthy and "No lesion predicted in this volume." in healthy


def _sprite(viewer: str, layer: str):
    from PIL import Image

    uri = re.search(rf'data-layer="{layer}" src="{PNG_URI}([^"]+)"', viewer).group(1)
    return Image.open(io.BytesIO(base64.b64decode(uri)))


def test_one_heat_scale_in_the_viewer_the_case_rows_and_detect_overlay_png(html, eval_dir):
    from PIL import Image

    from synomaly.figures import detection_png, map_levels, map_lut, map_scale

    assert map_scale(None) == map_scale(0.1) == 0.5 and map_scale(0.45) == 0.9 and map_scale(1.5) == 2.0
    lut = map_lut()
    # The report's threshold is 0.1, so every map picture runs from 0 to 0.5 in the same colours.
    assert "inferno, 0 to\n0.500 for every case" in html and "colours from 0 to\n0.500" in html
    sheet = _sprite(_viewer(html, "patient00"), "map")
    assert sheet.mode == "P" and np.array_equal(np.asarray(sheet.getpalette()[:768]).reshape(256, 3), lut)
    tile = np.asarray(sheet)[SIZE : 2 * SIZE, SIZE : 2 * SIZE]  # slice 5 in a grid of 4 columns
    assert np.array_equal(tile, map_levels(_volumes(eval_dir)["anomaly_map"][5], 0.5))
    # detect's overlay.png: the same colours for the same values on the same rule, and its colour bar.
    amap = np.full((SIZE, SIZE), 0.3, dtype=np.float32)
    png = Image.open(io.BytesIO(detection_png(np.zeros_like(amap), np.zeros_like(amap), amap, amap > 0.25, 0.2))).convert("RGB")
    pixels = np.asarray(png)
    scale = 256 // SIZE
    map_x = 2 * (SIZE * scale + 6)  # the third panel, below a 20-pixel title row
    assert (pixels[20 : 20 + SIZE * scale, map_x : map_x + SIZE * scale] == lut[map_levels(np.float32(0.3), 0.5)]).all()
    bar = pixels[20 : 20 + SIZE * scale, map_x + SIZE * scale + 6 + 7]  # the middle of the colour bar, top to bottom
    assert (bar[0] == lut[255]).all() and (bar[-1] == lut[0]).all()
    assert (bar == 255).all(axis=1).sum() >= 1  # the white threshold line


def test_without_volumes_the_report_says_why_and_has_no_script(eval_dir, tmp_path):
    for name in ("metrics.json", "cases.npz"):
        shutil.copy(eval_dir / name, tmp_path / name)
    html = build_report(tmp_path).read_text()
    assert "No whole volumes in this evaluation folder" in html and "<script" not in html


def test_a_damaged_volumes_file_is_named(eval_dir, tmp_path):
    for name in ("metrics.json", "cases.npz"):
        shutil.copy(eval_dir / name, tmp_path / name)
    volumes = _volumes(eval_dir)
    np.savez(tmp_path / "volumes.npz", **{**volumes, "mask": volumes["mask"][:, :5]})
    with pytest.raises(InputError, match=r"volumes.npz.*image arrays must all be \[M, H, W\]"):
        build_report(tmp_path)
    np.savez(tmp_path / "volumes.npz", **{**volumes, "volume": volumes["volume"] + 5})
    with pytest.raises(InputError, match="volume must index volume_id"):
        build_report(tmp_path, overwrite=True)
    np.savez(tmp_path / "volumes.npz", **{**volumes, "anomaly_map": volumes["anomaly_map"].astype(str)})
    with pytest.raises(InputError, match=r"arrays of the wrong type: anomaly_map \(<U"):
        build_report(tmp_path, overwrite=True)
    (tmp_path / "volumes.npz").write_bytes(b"not a zip")
    with pytest.raises(InputError, match="volumes.npz: not a readable npz archive"):
        build_report(tmp_path, overwrite=True)


def _chromium() -> str:
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("headless Chromium not installed (Debian package `chromium`); cannot run the viewer")
    return chromium


def _open(html: str, tmp_path: Path, name: str, script: str, *options: str) -> subprocess.CompletedProcess:
    """Open the report in headless Chromium with ``script`` run once the viewers are set up (on load,
    after their own handler), the volume section moved to the top of the page; returns the run."""
    page = tmp_path / f"{name}.html"
    prelude = 'var h = document.getElementById("volumes"); while (h.previousElementSibling) { h.previousElementSibling.remove(); }'
    page.write_text(html.replace("</body>", f'<script>window.addEventListener("load", function () {{ {prelude} {script} }});'
                                             "</script></body>"), encoding="utf-8")
    command = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,1000", *options, page.resolve().as_uri()]
    return subprocess.run(command, capture_output=True, text=True, timeout=90, check=False)


_SHOW = ('var root = document.querySelector(".viewer"), slider = root.querySelector("input[type=range]"); '
         'function show(k) { slider.value = String(k); slider.dispatchEvent(new Event("input")); } '
         'function pixel(panel, x, y) { var c = root.querySelector(\'canvas[data-panel="\' + panel + \'"]\'); '
         'return Array.from(c.getContext("2d").getImageData(x, y, 1, 1).data.slice(0, 3)).join(" "); }')


def test_two_slider_positions_give_different_screenshots(html, tmp_path):
    from PIL import Image

    shots = []
    for k in (0, 5):
        shot = tmp_path / f"slice{k}.png"
        _open(html, tmp_path, f"slice{k}", f"{_SHOW} show({k});", f"--screenshot={shot}")
        assert shot.is_file(), "Chromium wrote no screenshot"
        shots.append(np.asarray(Image.open(shot).convert("RGB")).astype(int))
    top, bottom = shots
    for pixels in shots:  # the four canvases are drawn: black backgrounds and gray heads in the panel area
        panels = pixels[250:800, 100:560]
        assert (panels.sum(axis=-1) == 0).mean() > 0.1 and len(np.unique(panels.reshape(-1, 3), axis=0)) > 50
    changed = np.abs(top - bottom).sum(axis=-1) > 30
    assert changed.sum() > 20_000  # whole panels change, not only the slice caption
    rows, cols = np.nonzero(changed)
    assert rows.max() - rows.min() > 300 and cols.max() - cols.min() > 300


def test_the_canvas_shows_the_slider_slice_and_a_lesion_click_moves_the_slider(html, eval_dir, tmp_path):
    image = _volumes(eval_dir)["image"]
    scale = 224 // SIZE  # each canvas is a whole multiple of the slice, the first at least 200 px
    x, y = 18 * scale + scale // 2, 12 * scale + scale // 2  # the lesion's centre
    script = _SHOW + f"var X = {x}, Y = {y}; " + (
        'var out = [], probes = []; show(0); out.push(slider.value); probes.push(pixel("image", X, Y)); '
        'var rows = root.querySelectorAll("tr[data-slice]"); rows[1].click(); out.push(slider.value); '
        'rows[0].click(); out.push(slider.value); probes.push(pixel("image", X, Y)); '
        'var here = Array.from(root.querySelectorAll("tr.here")).map(function (r) { return r.dataset.slice; }).join(" "); '
        'var filled = pixel("overlay", X, Y); root.querySelector(\'input[data-layer="mask"]\').click(); '
        'probes.push(filled === pixel("overlay", X, Y) ? "same" : "changed"); '
        'root.dispatchEvent(new KeyboardEvent("keydown", {key: "ArrowRight", bubbles: true})); out.push(slider.value); '
        'root.dispatchEvent(new KeyboardEvent("keydown", {key: "End", bubbles: true})); out.push(slider.value); '
        'root.querySelector(\'input[data-panel="map"]\').click(); '
        'document.body.setAttribute("data-trace", out.join(",")); document.body.setAttribute("data-probes", probes.join(",")); '
        'document.body.setAttribute("data-here", here); '
        'document.body.setAttribute("data-label", root.querySelector(".slice-label").textContent); '
        'document.body.setAttribute("data-map-hidden", String(root.querySelector(\'figure[data-panel="map"]\').hidden));'
    )
    dom = _open(html, tmp_path, "click", script, "--dump-dom").stdout
    trace = re.search(r'data-trace="([^"]*)"', dom)
    assert trace is not None, "the injected script did not run"
    assert trace.group(1) == f"0,{FALSE_POSITIVE},5,6,11"  # rows: the false positive, then the ball's central slice
    gray = [int(np.rint((np.clip(image[k, 12, 18], -1, 1) + 1) * 127.5)) for k in (0, 5)]
    assert re.search(r'data-probes="([^"]*)"', dom).group(1) == f"{gray[0]} {gray[0]} {gray[0]},{gray[1]} {gray[1]} {gray[1]},changed"
    assert 'data-here="5"' in dom and 'data-map-hidden="true"' in dom
    assert re.search(r'data-label="slice 31 \(12 of 12, vol0\[11\]\): reference 0 px, predicted 0 px"', dom)


@pytest.mark.parametrize(
    "sampler, shown, hidden",
    [
        ("one-step", [], ["chain_steps", "inpaint_t", "resamplings", "perceptual", "dilation", "mask_threshold"]),
        ("chain", ["chain_steps"], ["inpaint_t", "resamplings", "perceptual", "dilation", "mask_threshold"]),
        ("autoddpm", ["chain_steps", "inpaint_t", "resamplings", "perceptual", "dilation", "mask_threshold"], []),
    ],
)
def test_detection_settings_list_only_what_the_sampler_reads(sampler, shown, hidden):
    from synomaly.config import DetectConfig
    from synomaly.report_text import setup_tables

    detect = {**DetectConfig().__dict__, "sampler": sampler}
    rows = setup_tables({"detect": detect}, None)[0]["rows"]
    names = {name for name, _ in rows}
    assert {"t", "kernel", "threshold", "max_stages", "sampler"} <= names
    assert set(shown) <= names and not set(hidden) & names
