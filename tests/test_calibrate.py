"""Calibration: Dice grid search with its one-stage and stage-prefix shortcuts, the healthy-percentile
rule, every fallback with its warning, and thresholds.json round trips through from_pretrained."""

import json
import logging
import shutil

import numpy as np
import pytest
import torch
from helpers import per_slice_dice

from synomaly import SynomalyPipeline
from synomaly.calibrate import CalibrationGrid, UpperPercentile, calibrate, write_thresholds
from synomaly.calibration_rules import choose_row, grid_row
from synomaly.errors import ConfigError, InputError, OutputExistsError

SMALL_GRID = CalibrationGrid(t=(100, 200), kernel=(3, 5), threshold=(0.1, 0.2, 1.5), max_stages=(1, 2, 3))
N_HEALTHY = 16


@pytest.fixture(scope="module")
def calibrated(trained, phantom_test):
    """Small-grid calibration on 16 healthy + 48 lesioned phantoms, each class in one batch."""
    healthy, lesioned, masks = phantom_test
    images = torch.cat([healthy[:N_HEALTHY], lesioned])
    targets = torch.cat([torch.zeros_like(masks[:N_HEALTHY]), masks])
    return calibrate(trained, images, targets, grid=SMALL_GRID, batch_size=64, progress=False)


@pytest.mark.parametrize(
    "kwargs, option",
    [
        ({"t": (-1,)}, "grid.t"),
        ({"t": ()}, "grid.t"),
        ({"kernel": (3, 4)}, "grid.kernel"),
        ({"threshold": (2.5,)}, "grid.threshold"),
        ({"max_stages": (0,)}, "grid.max_stages"),
        ({"fusion": ("soft",)}, "grid.fusion"),
        ({"t": (1.5,)}, "grid.t"),
        ({"kernel": 3}, "grid.kernel"),
    ],
)
def test_grid_rejects_bad_values_naming_the_field(kwargs, option):
    with pytest.raises(ConfigError, match=option):
        CalibrationGrid(**kwargs)


@pytest.mark.slow
def test_dice_grid_picks_the_fewest_stages_within_one_standard_error_of_the_best(calibrated):
    assert calibrated.method == "dice-grid" and calibrated.selection == "fewer-stages"
    assert len(calibrated.table) == 2 * 2 * 3 * 3
    best = max(calibrated.table, key=lambda row: row["dice"])
    assert calibrated.best["dice"] == pytest.approx(best["dice"], abs=1e-12) and best["dice_se"] > 0
    chosen = [row for row in calibrated.table if {k: row[k] for k in calibrated.detect} == calibrated.detect]
    assert len(chosen) == 1 and chosen[0]["dice"] == calibrated.score
    close = [row for row in calibrated.table if row["dice"] >= best["dice"] - best["dice_se"] - 1e-12]
    assert chosen[0] in close and chosen[0]["max_stages"] == min(row["max_stages"] for row in close)
    bad = [row["dice"] for row in calibrated.table if row["threshold"] == 1.5]
    assert max(bad) == 0.0 and calibrated.score > 0.6
    assert (calibrated.n_anomalous, calibrated.n_healthy) == (48, N_HEALTHY)
    assert calibrated.warnings == []
    assert json.loads(json.dumps(calibrated.to_dict(), allow_nan=False))["grid"]["max_stages"] == [1, 2, 3]


def _row(stages: int, dice: float, se: float, nfe: float | None = None, t: int = 100) -> dict:
    return {"t": t, "kernel": 3, "threshold": 0.2, "max_stages": stages, "fusion": "binary", "dice": dice,
            "dice_se": se, "nfe": stages if nfe is None else nfe, "n": 40}


@pytest.mark.parametrize(
    "table, best, fewer",
    [
        # 5 stages gain 0.01 over 2 stages, inside the best point's standard error 0.02: 2 stages are taken.
        ([_row(1, 0.50, 0.02), _row(2, 0.60, 0.02), _row(5, 0.61, 0.02)], 2, 1),
        # the same gain with a standard error of 0.005 is real: 5 stages stay.
        ([_row(1, 0.50, 0.005), _row(2, 0.60, 0.005), _row(5, 0.61, 0.005)], 2, 2),
        # within the error, the fewest stages win even over a higher Dice at more stages.
        ([_row(5, 0.61, 0.05), _row(3, 0.60, 0.01), _row(1, 0.57, 0.01)], 0, 2),
        # a standard error of zero: the best point.
        ([_row(5, 0.61, 0.0), _row(1, 0.60, 0.1)], 0, 0),
        # equal Dice at equal stages: fewer network evaluations, then smaller t.
        ([_row(3, 0.6, 0.0, nfe=2.5, t=200), _row(3, 0.6, 0.0, nfe=2.5, t=100), _row(3, 0.6, 0.0, nfe=3.0)], 1, 1),
    ],
)
def test_selection_rules_on_known_tables(table, best, fewer):
    assert choose_row(table, "best") is table[best]
    assert choose_row(table, "fewer-stages") is table[fewer]


def test_grid_row_standard_error_matches_numpy():
    values = np.array([0.2, 0.5, 0.9, 0.4])
    row = grid_row((100, 3, 0.2, 1, "binary"), values.sum(), 4.0, 4, float((values**2).sum()))
    assert row["dice"] == pytest.approx(values.mean())
    assert row["dice_se"] == pytest.approx(values.std(ddof=1) / 2)
    assert grid_row((100, 3, 0.2, 1, "binary"), 0.3, 1.0, 1, 0.09)["dice_se"] == 0.0


def test_an_unknown_selection_is_refused_before_any_work(random_pipeline, phantom_test):
    with pytest.raises(ConfigError, match="selection.*fewer-stages, best"):
        calibrate(random_pipeline, phantom_test[0][:2], selection="highest", progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("max_stages", [1, 2, 3])
def test_table_rows_equal_pipeline_detect_with_the_same_seed(calibrated, trained, phantom_test, max_stages):
    # max_stages=1 rows come from the one-reconstruction-per-t shortcut, 2 from the 3-stage run's prefix.
    _, lesioned, masks = phantom_test
    for settings in ({"t": 200, "kernel": 5, "threshold": 0.2}, {"t": 100, "kernel": 3, "threshold": 0.1}):
        row = next(
            r for r in calibrated.table if r["max_stages"] == max_stages and {k: r[k] for k in settings} == settings
        )
        out = trained.detect(lesioned, generator=torch.Generator().manual_seed(0), max_stages=max_stages, **settings)
        values = np.asarray(per_slice_dice(out.mask, masks), dtype=np.float64)
        assert row["dice"] == pytest.approx(float(values.mean()), abs=1e-12)
        assert row["dice_se"] == pytest.approx(float(values.std(ddof=1) / len(values) ** 0.5), abs=1e-9)
        assert row["nfe"] == pytest.approx(out.stages.double().mean().item(), abs=1e-12)


@pytest.mark.slow
def test_healthy_percentile_equals_numpy_on_independent_maps(calibrated, trained, phantom_test):
    healthy = phantom_test[0][:N_HEALTHY]
    t, kernel = calibrated.detect["t"], calibrated.detect["kernel"]
    out = trained.detect(healthy, generator=torch.Generator().manual_seed(0), max_stages=1, t=t, kernel=kernel)
    expected = np.percentile(out.anomaly_map.numpy(), 99.0)
    assert calibrated.healthy_percentile_threshold == pytest.approx(expected, rel=1e-6)
    assert calibrated.detect["threshold"] != calibrated.healthy_percentile_threshold  # Dice chose it


def test_healthy_percentile_with_foreground_over_several_batches(random_pipeline, phantom_test):
    healthy = phantom_test[0][:10]
    foreground = healthy > -0.99
    result = calibrate(
        random_pipeline, healthy, foreground=foreground, percentile=95.0, batch_size=3, seed=7, progress=False
    )
    generator = torch.Generator().manual_seed(7)
    config = random_pipeline.config.detect
    maps = [
        random_pipeline.detect(healthy[i : i + 3], generator, foreground[i : i + 3], max_stages=1).anomaly_map
        for i in range(0, 10, 3)
    ]
    expected = np.percentile(torch.cat(maps)[foreground].numpy(), 95.0)
    assert result.healthy_percentile_threshold == pytest.approx(expected, rel=1e-6)
    assert result.detect == {"t": config.t, "kernel": config.kernel, "threshold": result.healthy_percentile_threshold,
                             "max_stages": config.max_stages, "fusion": config.fusion}


@pytest.mark.parametrize("q", [0.0, 37.5, 99.0, 100.0])
def test_upper_percentile_matches_numpy_when_fed_in_chunks(q):
    values = torch.rand(1000, generator=torch.Generator().manual_seed(0)) ** 3
    quantile = UpperPercentile(values.numel(), q)
    for chunk in values.split(77):
        quantile.update(chunk)
    assert quantile.compute() == pytest.approx(np.percentile(values.double().numpy(), q), rel=1e-6)
    assert len(quantile.top) <= 1000 - int(q / 100 * 999)


def _no_masks(healthy, lesioned, masks):
    return {"images": healthy, "masks": None}


def _empty_masks(healthy, lesioned, masks):
    return {"images": healthy, "masks": torch.zeros_like(masks[:8])}


def _all_anomalous(healthy, lesioned, masks):
    return {"images": lesioned, "masks": masks[:8]}


def _no_healthy_foreground(healthy, lesioned, masks):
    return {"images": healthy, "masks": None, "foreground": torch.zeros_like(masks[:8])}


@pytest.mark.parametrize(
    "case, method, messages",
    [
        (_no_masks, "healthy-percentile", ["no lesions in the validation masks"]),
        (_empty_masks, "healthy-percentile", ["no lesions in the validation masks"]),
        (_all_anomalous, "dice-grid", ["no healthy validation slices", "the best validation Dice is"]),
        (
            _no_healthy_foreground,
            "default",
            ["no foreground pixels", "no lesions in the validation masks", "keeping the configured"],
        ),
    ],
)
def test_fallbacks_log_their_warning_and_method(random_pipeline, phantom_test, caplog, case, method, messages):
    healthy, lesioned, masks = (x[:8] for x in phantom_test)
    grid = CalibrationGrid(t=(100,), kernel=(3,), threshold=(0.1, 0.2), max_stages=(1, 2))
    with caplog.at_level(logging.WARNING, logger="synomaly.calibrate"):
        result = calibrate(random_pipeline, grid=grid, progress=False, **case(healthy, lesioned, masks))
    logged = [r.getMessage() for r in caplog.records if r.name == "synomaly.calibrate" and r.levelno == logging.WARNING]
    assert logged == result.warnings
    assert len(logged) == len(messages) and all(m in w for m, w in zip(messages, logged))
    assert result.method == method
    config = random_pipeline.config.detect
    if method == "healthy-percentile":
        assert result.detect["threshold"] == result.healthy_percentile_threshold is not None
        assert (result.n_anomalous, result.n_healthy, result.table, result.score) == (0, 8, [], None)
    elif method == "default":
        assert result.detect == {k: getattr(config, k) for k in ("t", "kernel", "threshold", "max_stages", "fusion")}
        assert result.healthy_percentile_threshold is None
    else:
        assert result.healthy_percentile_threshold is None and (result.n_anomalous, result.n_healthy) == (8, 0)
        assert len(result.table) == 2 * 2 and result.score == max(r["dice"] for r in result.table)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"images": torch.zeros(0, 1, 32, 32)}, ValueError, "no images"),
        ({"images": torch.zeros(2, 32, 32)}, ValueError, r"\[N, 1, H, W\]"),
        ({"masks": torch.zeros(3, 1, 32, 32, dtype=torch.bool)}, ValueError, "masks must be shaped"),
        ({"grid": CalibrationGrid(t=(1000,))}, ConfigError, "grid.t"),
        ({"percentile": 101.0}, ValueError, "percentile"),
        ({"batch_size": 0}, ConfigError, "batch_size"),
    ],
)
def test_bad_inputs_are_rejected(random_pipeline, kwargs, error, message):
    args = {"images": torch.zeros(2, 1, 32, 32), **kwargs}
    with pytest.raises(error, match=message):
        calibrate(random_pipeline, progress=False, **args)


@pytest.mark.slow
def test_thresholds_json_is_loaded_by_from_pretrained(calibrated, tiny_model_dir, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    before = SynomalyPipeline.from_pretrained(folder).config.detect
    path = write_thresholds(folder, calibrated)
    after = SynomalyPipeline.from_pretrained(folder).config.detect
    assert {k: getattr(after, k) for k in calibrated.detect} == calibrated.detect
    assert {k: getattr(before, k) for k in calibrated.detect} != calibrated.detect
    assert (after.min_size, after.connectivity) == (before.min_size, before.connectivity)
    saved = json.loads(path.read_text())
    assert saved["calibration"]["method"] == "dice-grid" and saved["calibration"]["version"]
    assert len(saved["calibration"]["table"]) == len(calibrated.table)
    assert saved["calibration"]["healthy_percentile_threshold"] == calibrated.healthy_percentile_threshold


def test_write_thresholds_refuses_to_overwrite(random_pipeline, tmp_path):
    random_pipeline.save_pretrained(tmp_path)
    result = calibrate(random_pipeline, torch.zeros(2, 1, 32, 32), progress=False)
    write_thresholds(tmp_path, result)
    result.detect["threshold"] = 0.37
    with pytest.raises(OutputExistsError, match="thresholds.json"):
        write_thresholds(tmp_path, result)
    assert SynomalyPipeline.from_pretrained(tmp_path).config.detect.threshold != 0.37
    write_thresholds(tmp_path, result, overwrite=True)
    assert SynomalyPipeline.from_pretrained(tmp_path).config.detect.threshold == 0.37
    with pytest.raises(InputError, match="model folder not found"):
        write_thresholds(tmp_path / "missing", result)


def test_an_interrupted_calibration_resumes_where_it_stopped(trained, phantom_test, tmp_path, monkeypatch):
    healthy, lesioned, masks = phantom_test
    images = torch.cat([healthy[:4], lesioned[:8]])
    targets = torch.cat([torch.zeros_like(masks[:4]), masks[:8]])
    grid = CalibrationGrid(t=(100, 200), kernel=(3,), threshold=(0.2, 0.3), max_stages=(1, 2))
    options = {"grid": grid, "batch_size": 4, "progress": False}
    uninterrupted = calibrate(trained, images, targets, **options)
    progress = tmp_path / "calibration-progress.json"
    detect, calls = type(trained).detect, []

    def detect_then_stop(self, *args, **kwargs):
        calls.append(kwargs["config"].threshold)
        if len(calls) == 3:  # the second multi-stage pass (two batches of lesioned slices each) is cut short
            raise KeyboardInterrupt
        return detect(self, *args, **kwargs)

    monkeypatch.setattr(type(trained), "detect", detect_then_stop)
    with pytest.raises(KeyboardInterrupt):
        calibrate(trained, images, targets, resume_file=progress, **options)
    assert len(json.loads(progress.read_text())["passes"]) == 3  # two one-stage passes (t = 100, 200), one multi-stage
    calls.clear()
    monkeypatch.setattr(type(trained), "detect", lambda self, *a, **k: calls.append(1) or detect(self, *a, **k))
    resumed = calibrate(trained, images, targets, resume_file=progress, **options)
    assert len(calls) == 2 * 3  # only the three unscored multi-stage passes ran, two batches each
    assert resumed.table == uninterrupted.table and resumed.detect == uninterrupted.detect
    assert not progress.exists()


def test_calibration_progress_of_other_settings_is_not_reused(trained, phantom_test, tmp_path):
    healthy, lesioned, masks = phantom_test
    grid = CalibrationGrid(t=(100,), kernel=(3,), threshold=(0.2, 0.3), max_stages=(1,))
    progress = tmp_path / "calibration-progress.json"
    fresh = calibrate(trained, lesioned[:8], masks[:8], grid=grid, batch_size=4, progress=False, seed=1)
    row = fresh.table[0]
    key = json.dumps(["one stage", 100, [3], [0.2, 0.3]])
    progress.write_text(json.dumps({"fingerprint": "another model", "passes": {key: [{**row, "dice": 1.0}] * 2}}))
    again = calibrate(trained, lesioned[:8], masks[:8], grid=grid, batch_size=4, progress=False, seed=1,
                      resume_file=progress)
    assert again.table == fresh.table and not progress.exists()


def test_calibration_progress_fingerprint_follows_seed_batch_data_and_weights(random_pipeline):
    from synomaly.calibrate import _fingerprint

    images = torch.rand(4, 1, 32, 32) * 2 - 1
    base = _fingerprint(random_pipeline, (images, None, None), 0, 4)
    assert base == _fingerprint(random_pipeline, (images.clone(), None, None), 0, 4)
    assert base != _fingerprint(random_pipeline, (images, None, None), 1, 4)
    assert base != _fingerprint(random_pipeline, (images, None, None), 0, 2)
    assert base != _fingerprint(random_pipeline, (-images, None, None), 0, 4)
    with torch.no_grad():
        next(random_pipeline.unet.parameters()).add_(1e-3)
    assert base != _fingerprint(random_pipeline, (images, None, None), 0, 4)


def test_calibrating_the_shipped_model_is_refused_before_any_work(tmp_path, monkeypatch):
    from synomaly.commands import run_calibrate

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="shipped with the package"):
        run_calibrate("demo", ["missing.npz:x"], device="cpu")
    assert list(tmp_path.iterdir()) == []  # no ./demo folder made to hold the progress or thresholds


def test_the_low_dice_warning_reads_the_best_point_not_the_chosen_one():
    from synomaly.calibration_rules import CalibrationResult, apply_fallbacks

    def result(best: float, chosen: float) -> CalibrationResult:
        return CalibrationResult(detect={"threshold": 0.2}, method="dice-grid", score=chosen, table=[],
                                 healthy_percentile_threshold=0.3, n_anomalous=40, n_healthy=10,
                                 best={"dice": best, "dice_se": 0.02})

    within = result(best=0.06, chosen=0.045)  # fewer stages within the error, below LOW_DICE: the best is not
    apply_fallbacks(within)
    assert within.warnings == []
    low = result(best=0.04, chosen=0.03)
    apply_fallbacks(low)
    assert any("the best validation Dice is 0.040" in w for w in low.warnings)


def test_the_time_estimate_costs_one_network_call_even_for_autoddpm(random_pipeline, caplog):
    import dataclasses

    from synomaly.calibrate import _announce

    pipe = random_pipeline
    pipe.config = dataclasses.replace(pipe.config, detect=pipe.detect_config(sampler="autoddpm", chain_steps=2, inpaint_t=3,
                                                                              resamplings=2))
    calls = []
    network = pipe.network
    pipe.network = lambda x, t: calls.append(len(x)) or network(x, t)
    size = pipe.preprocessing.size
    images = torch.zeros(5, 1, size, size)
    with caplog.at_level(logging.INFO, logger="synomaly.calibrate"):
        _announce(pipe, images, CalibrationGrid(t=(20,), kernel=(3,), threshold=(0.1,), max_stages=(1,)), 3, 2, 4)
    assert calls == [4]  # one batch through the network, not a 2 + 3 x 2 evaluation reconstruction
    assert "at most 40 network evaluations" in caplog.text  # (2 + 6) per image, 5 images
