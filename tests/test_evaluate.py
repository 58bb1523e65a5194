"""Evaluation: metrics against independent detect runs, per-stage Dice, curves, the running case
selection, and the metrics.json / CSV / cases.npz round trip."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from synomaly import SynomalyPipeline
from synomaly.config import PipelineConfig, model_preset
from synomaly.errors import ConfigError, OutputExistsError
from synomaly.evaluate import evaluate, read_evaluation, write_evaluation
from synomaly.model import build_unet

N_HEALTHY, N_LESIONED, BATCH, STAGES, KEEP = 12, 20, 7, 3, 8
CASE_IDS = [f"case{i:02d}" for i in range(N_HEALTHY + N_LESIONED)]
GROUP_IDS = [f"vol{i // 4}" for i in range(N_HEALTHY + N_LESIONED)]


@pytest.fixture(scope="module")
def data(phantom_test):
    healthy, lesioned, masks = phantom_test
    images = torch.cat([healthy[:N_HEALTHY], lesioned[:N_LESIONED]])
    targets = torch.cat([torch.zeros_like(masks[:N_HEALTHY]), masks[:N_LESIONED]])
    return images, targets


@pytest.fixture(scope="module")
def trained(tiny_model_dir):
    return SynomalyPipeline.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def result(trained, data):
    images, targets = data
    return evaluate(trained, images, targets, case_ids=CASE_IDS, group_ids=GROUP_IDS, batch_size=BATCH,
                    keep_cases=KEEP, progress=False, max_stages=STAGES)


def per_slice_dice(pred, target):
    inter = (pred & target).flatten(1).sum(1).double()
    total = (pred.flatten(1).sum(1) + target.flatten(1).sum(1)).double()
    return torch.where(total > 0, 2 * inter / total.clamp(min=1), torch.ones_like(total)).numpy()


@pytest.fixture(scope="module")
def reference(trained, data):
    """``detect`` over the same batches with one generator, as ``evaluate`` runs it."""
    images, targets = data
    generator = torch.Generator().manual_seed(0)
    outs = [trained.detect(images[i : i + BATCH], generator, max_stages=STAGES) for i in range(0, len(images), BATCH)]
    stages = torch.cat([o.stages for o in outs])
    ran = int(stages.max())
    # An image that stopped at stage s keeps its stage-s mask in every later stage.
    stage_masks = torch.cat([o.stage_masks[:, torch.arange(ran).clamp(max=o.stage_masks.shape[1] - 1)] for o in outs])
    stage_dice = [per_slice_dice(stage_masks[:, k], targets)[N_HEALTHY:].mean() for k in range(ran)]
    mask = torch.cat([o.mask for o in outs])
    return {"dice": per_slice_dice(mask, targets), "stages": stages.numpy(),
            "map": torch.cat([o.anomaly_map for o in outs]), "dice_per_stage": stage_dice}


@pytest.fixture
def random_pipeline():
    torch.manual_seed(0)
    return SynomalyPipeline(build_unet(model_preset("tiny")), PipelineConfig(model=model_preset("tiny")))


@pytest.mark.slow
def test_metrics_hold_every_documented_key(result, trained):
    metrics = result.metrics
    assert {"settings", "per_case", "aggregate", "per_volume", "detect", "curves"} <= set(metrics)
    expected = {"dice_mean", "iou_mean", "precision_mean", "recall_mean", "dice_pooled", "ap", "auroc_pixel",
                "auroc_image", "ap_image", "hd95_mean", "ssim_healthy", "dice_volume_mean", "nfe_mean", "nfe_max",
                "ms_per_image", "dice_per_stage"}
    assert expected <= set(metrics["aggregate"])
    assert metrics["detect"] == dataclasses.asdict(trained.detect_config(max_stages=STAGES))
    assert metrics["settings"]["seed"] == 0 and metrics["settings"]["batch_size"] == BATCH
    assert metrics["aggregate"]["ms_per_image"] > 0
    assert metrics["aggregate"]["auroc_image"] > 0.7  # mask area separates lesioned from healthy phantoms
    assert len(metrics["per_volume"]) == len(set(GROUP_IDS))


@pytest.mark.slow
def test_per_case_dice_matches_an_independent_detect_run(result, reference):
    rows = result.metrics["per_case"]
    assert [r["case_id"] for r in rows] == CASE_IDS
    np.testing.assert_allclose([r["dice"] for r in rows], reference["dice"], atol=1e-12)
    anomalous = [r["dice"] for r in rows if r["anomalous"]]
    assert len(anomalous) == N_LESIONED
    assert result.metrics["aggregate"]["dice_mean"] == pytest.approx(np.mean(anomalous), abs=1e-12)
    assert result.metrics["aggregate"]["dice_mean"] > 0.5


@pytest.mark.slow
def test_cost_and_dice_per_stage(result, reference):
    aggregate = result.metrics["aggregate"]
    assert aggregate["nfe_mean"] == pytest.approx(reference["stages"].mean())
    assert aggregate["nfe_max"] == reference["stages"].max()
    per_stage = aggregate["dice_per_stage"]
    assert len(per_stage) == reference["stages"].max() <= STAGES
    # Stopped images keep their last mask, so the last stage is the final result even with mixed stops.
    assert per_stage[-1] == pytest.approx(aggregate["dice_mean"], abs=1e-12)
    np.testing.assert_allclose(per_stage, reference["dice_per_stage"], atol=1e-12)
    assert len(set(reference["stages"][N_HEALTHY:].tolist())) > 1  # the padding was exercised


@pytest.mark.slow
def test_dice_per_stage_pads_batches_that_stopped_early(trained, data):
    # One image per batch: a batch whose image stopped early has fewer stages than the run's maximum.
    images, targets = data
    lesioned = slice(N_HEALTHY, N_HEALTHY + 8)
    out = evaluate(trained, images[lesioned], targets[lesioned], case_ids=CASE_IDS[lesioned], batch_size=1,
                   keep_cases=2, progress=False, max_stages=STAGES)
    aggregate = out.metrics["aggregate"]
    assert aggregate["nfe_max"] == len(aggregate["dice_per_stage"]) and aggregate["nfe_mean"] < aggregate["nfe_max"]
    assert aggregate["dice_per_stage"][-1] == pytest.approx(aggregate["dice_mean"], abs=1e-12)
    assert out.cases["stage_masks"].shape[1] == aggregate["nfe_max"]
    np.testing.assert_array_equal(out.cases["stage_masks"][:, -1], out.cases["mask"])


@pytest.mark.slow
def test_curves_are_monotone_and_consistent_with_pixel_auroc(result):
    curves = result.metrics["curves"]
    precision, recall = np.array(curves["pr"]["precision"]), np.array(curves["pr"]["recall"])
    fpr, tpr = np.array(curves["roc"]["fpr"]), np.array(curves["roc"]["tpr"])
    for values in (precision, recall, fpr, tpr):
        assert 10 < len(values) <= 201 and values.min() >= 0.0 and values.max() <= 1.0
    assert np.all(np.diff(recall) <= 0) and np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    assert area == pytest.approx(result.metrics["aggregate"]["auroc_pixel"], abs=0.02)


@pytest.mark.slow
def test_kept_cases_are_the_worst_best_and_the_healthy_with_the_largest_area(result, reference):
    cases, rows = result.cases, result.metrics["per_case"]
    assert len(cases["case_id"]) == KEEP and cases["case_id"].dtype.kind == "U"
    ranked = sorted((r["dice"], i) for i, r in enumerate(rows) if r["anomalous"])
    n_anomalous = KEEP - KEEP // 4
    expected = [CASE_IDS[i] for _, i in ranked[: (n_anomalous + 1) // 2] + ranked[-(n_anomalous // 2) :]]
    assert list(cases["case_id"][:n_anomalous]) == expected
    healthy = sorted((-r["tp"] - r["fp"], i) for i, r in enumerate(rows) if not r["anomalous"])  # largest area first
    assert list(cases["case_id"][n_anomalous:]) == [CASE_IDS[i] for _, i in healthy[: KEEP // 4]]
    assert np.isnan(cases["dice"][n_anomalous:]).all() and not np.isnan(cases["dice"][:n_anomalous]).any()
    index = [CASE_IDS.index(c) for c in cases["case_id"]]
    np.testing.assert_allclose(cases["dice"][:n_anomalous], reference["dice"][index[:n_anomalous]], atol=1e-12)
    np.testing.assert_array_equal(cases["anomaly_map"], reference["map"][index, 0].numpy())
    np.testing.assert_array_equal(cases["stages"], reference["stages"][index])
    stages = reference["stages"].max()
    for key, dtype in (("image", np.float32), ("reconstruction", np.float32), ("mask", bool), ("target", bool)):
        assert cases[key].shape == (KEEP, 32, 32) and cases[key].dtype == dtype
    assert cases["stage_masks"].shape == (KEEP, stages, 32, 32) and cases["stage_reconstructions"].dtype == np.float32
    np.testing.assert_array_equal(cases["stage_masks"][:, -1], cases["mask"])
    np.testing.assert_array_equal(cases["stage_reconstructions"][:, -1], cases["reconstruction"])


@pytest.mark.slow
def test_write_and_read_round_trip(result, tmp_path):
    write_evaluation(result, tmp_path)
    text = (tmp_path / "metrics.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    metrics, cases = read_evaluation(tmp_path)
    assert metrics["aggregate"]["dice_mean"] == result.metrics["aggregate"]["dice_mean"]
    assert metrics["curves"] == result.metrics["curves"]
    healthy = metrics["per_case"][0]
    assert math.isnan(result.metrics["per_case"][0]["hd95"]) and healthy["hd95"] is None
    assert set(cases) == set(result.cases)
    for key, values in result.cases.items():
        np.testing.assert_array_equal(cases[key], values)
        assert cases[key].dtype == values.dtype
    with np.load(tmp_path / "cases.npz", allow_pickle=False) as archive:
        assert archive["case_id"].tolist() == result.cases["case_id"].tolist()
    lines = (tmp_path / "per_case.csv").read_text().splitlines()
    assert lines[0].startswith("case_id,group_id,") and len(lines) == 1 + len(CASE_IDS)
    assert len((tmp_path / "per_volume.csv").read_text().splitlines()) == 1 + len(set(GROUP_IDS))


def test_all_healthy_data_gives_null_metrics_and_no_volume_table(random_pipeline, phantom_test, tmp_path):
    healthy = phantom_test[0][:6]
    out = evaluate(random_pipeline, healthy, None, case_ids=list("abcdef"), batch_size=4, keep_cases=3,
                   progress=False, max_stages=2)
    assert out.metrics["curves"]["roc"] == {"fpr": [], "tpr": []}
    assert math.isnan(out.metrics["aggregate"]["dice_mean"]) and "per_volume" not in out.metrics
    areas = {row["case_id"]: row["fp"] for row in out.metrics["per_case"]}
    expected = sorted("abcdef", key=lambda c: (-areas[c], c))[:3]  # the largest predicted areas, first met on ties
    assert out.cases["case_id"].tolist() == expected and np.isnan(out.cases["dice"]).all()
    (tmp_path / "per_volume.csv").write_text("stale\n")  # left by an earlier run with volume ids
    write_evaluation(out, tmp_path, overwrite=True)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["aggregate"]["dice_mean"] is None and saved["aggregate"]["dice_per_stage"] == [None] * 2
    assert not (tmp_path / "per_volume.csv").exists()


def test_keep_no_cases_still_writes_loadable_arrays(random_pipeline, phantom_test, tmp_path):
    _, lesioned, masks = phantom_test
    out = evaluate(random_pipeline, lesioned[:3], masks[:3], case_ids=["x", "y", "z"], keep_cases=0, progress=False,
                   max_stages=1)
    write_evaluation(out, tmp_path)
    _, cases = read_evaluation(tmp_path)
    assert cases["image"].shape == (0, 32, 32) and cases["stage_masks"].shape == (0, 1, 32, 32)
    assert out.metrics["aggregate"]["dice_per_stage"] == [pytest.approx(out.metrics["aggregate"]["dice_mean"])]


def test_write_refuses_to_overwrite(random_pipeline, phantom_test, tmp_path):
    images = phantom_test[0][:2]
    out = evaluate(random_pipeline, images, None, case_ids=["a", "b"], progress=False, max_stages=1)
    write_evaluation(out, tmp_path)
    out.metrics["aggregate"]["nfe_mean"] = 99.0
    with pytest.raises(OutputExistsError, match="metrics.json"):
        write_evaluation(out, tmp_path)
    assert read_evaluation(tmp_path)[0]["aggregate"]["nfe_mean"] == 1.0
    write_evaluation(out, tmp_path, overwrite=True)
    assert read_evaluation(tmp_path)[0]["aggregate"]["nfe_mean"] == 99.0


def test_an_overwrite_that_fails_midway_leaves_no_complete_looking_evaluation(random_pipeline, phantom_test, tmp_path,
                                                                             monkeypatch):
    from synomaly.commands import run_report
    from synomaly.errors import InputError

    images = phantom_test[0][:2]
    out = evaluate(random_pipeline, images, None, case_ids=["a", "b"], progress=False, max_stages=1)
    write_evaluation(out, tmp_path)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez_compressed", disk_full)  # the new tables are written, then the disk fills up
    with pytest.raises(OSError):
        write_evaluation(out, tmp_path, overwrite=True)
    assert not (tmp_path / "metrics.json").exists()
    with pytest.raises(InputError, match="metrics.json: missing"):
        run_report(tmp_path)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"case_ids": ["a"]}, ValueError, "1 case ids for 2 images"),
        ({"group_ids": ["g"]}, ValueError, "1 group ids"),
        ({"keep_cases": -1}, ConfigError, "keep_cases"),
        ({"batch_size": 0}, ConfigError, "batch_size"),
        ({"kernel": 4}, ConfigError, "detect.kernel"),
        ({"ap_thresholds": 1}, ConfigError, "ap_thresholds"),
    ],
)
def test_bad_arguments_are_rejected(random_pipeline, kwargs, error, message):
    args = {"case_ids": ["a", "b"], **kwargs}
    with pytest.raises(error, match=message):
        evaluate(random_pipeline, torch.zeros(2, 1, 32, 32), None, progress=False, **args)


def test_oracle_dice_is_the_best_mean_and_pooled_dice_over_map_thresholds():
    from synomaly.evaluate import MAP_MAX, _OracleDice
    from synomaly.metrics import confusion_counts, dice

    g = torch.Generator().manual_seed(0)
    maps = torch.rand(6, 1, 12, 12, generator=g) * 0.8
    targets = maps + 0.3 * torch.rand(6, 1, 12, 12, generator=g) > 0.7
    targets[4:] = False  # two healthy slices
    oracle = _OracleDice(levels=50)
    oracle.update(maps[:3], targets[:3])
    oracle.update(maps[3:], targets[3:])
    result = oracle.compute()
    levels = torch.linspace(0, MAP_MAX, 51)[1:]
    means = [float(dice(confusion_counts(maps[:4] >= lv, targets[:4])).mean()) for lv in levels]
    pooled = [float(dice(confusion_counts(maps >= lv, targets).sum())) for lv in levels]
    assert result["dice_oracle_mean"] == pytest.approx(max(means))
    assert result["dice_oracle_pooled"] == pytest.approx(max(pooled))
    assert result["dice_oracle_threshold"] == pytest.approx(float(levels[int(np.argmax(means))]))


def test_kept_cases_record_the_foreground_their_maps_count_in(random_pipeline, phantom_test):
    healthy, lesioned, masks = phantom_test
    foreground = torch.zeros_like(masks[:3])
    foreground[..., 4:28, 4:28] = True
    out = evaluate(random_pipeline, lesioned[:3], masks[:3], foreground=foreground, case_ids=["x", "y", "z"],
                   keep_cases=3, progress=False, max_stages=1)
    kept = {str(case): i for i, case in enumerate(out.cases["case_id"])}
    assert sorted(kept) == ["x", "y", "z"]
    for j, case in enumerate("xyz"):
        if case in kept:
            assert np.array_equal(out.cases["foreground"][kept[case]], foreground[j, 0].numpy())
            assert not out.cases["anomaly_map"][kept[case]][~foreground[j, 0].numpy()].any()


@pytest.mark.slow
def test_also_thresholds_equal_separate_one_stage_evaluations(trained, data):
    # With a foreground and the small-component filter, as a calibrated model runs: the extra masks must be the
    # masks a separate evaluation at that threshold makes.
    images, targets = data
    foreground = torch.ones_like(targets)
    foreground[..., :4, :] = False
    common = dict(case_ids=CASE_IDS, batch_size=BATCH, keep_cases=2, progress=False, foreground=foreground, max_stages=1,
                  min_size=3)
    levels = (0.05, 0.12)
    first = evaluate(trained, images, targets, threshold=0.2, also_thresholds=levels, **common).metrics
    for row, level in zip(first["aggregate_at"], levels):
        alone = evaluate(trained, images, targets, threshold=level, **common).metrics["aggregate"]
        assert row["threshold"] == level
        for key in ("dice_mean", "dice_pooled", "iou_mean", "fpr_healthy_mean"):
            assert row[key] == pytest.approx(alone[key], abs=1e-12), key
    assert first["aggregate_at"][0]["fpr_healthy_mean"] > first["aggregate"]["fpr_healthy_mean"]  # a lower threshold flags more
    assert "aggregate_at" not in evaluate(trained, images, targets, **common).metrics


def test_also_thresholds_are_refused_for_multi_stage_settings(random_pipeline, data):
    images, targets = data
    with pytest.raises(ConfigError, match="one-stage"):
        evaluate(random_pipeline, images[:2], targets[:2], case_ids=CASE_IDS[:2], progress=False, max_stages=2,
                 also_thresholds=(0.1,))
