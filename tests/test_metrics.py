"""Tests of synomaly.metrics against scikit-learn, scikit-image, brute-force oracles and hand counts."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import (
    average_precision_score,
    f1_score,
    jaccard_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from synomaly import metrics
from synomaly.errors import ConfigError
from synomaly.metrics._overlap import _COUNT_METRICS


def random_masks(seed: int, shape=(8, 1, 24, 32), density: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    pred = torch.rand(shape, generator=g) < density
    target = torch.rand(shape, generator=g) < density
    return pred, target


def blob_masks(seed: int, shape=(6, 1, 32, 40), level: float = 0.4) -> torch.Tensor:
    """Random blobs (several components, some touching the border) by thresholding smoothed noise."""
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=(0, 0, 3, 3))
    return torch.from_numpy(noise > level * noise.std())


def test_confusion_counts_match_hand_counts():
    pred = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool).reshape(2, 1, 2, 2)
    target = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.bool).reshape(2, 1, 2, 2)
    counts = metrics.confusion_counts(pred, target)
    assert counts.tp.tolist() == [1, 0]
    assert counts.fp.tolist() == [1, 0]
    assert counts.fn.tolist() == [1, 1]
    assert counts.tn.tolist() == [1, 3]
    assert counts.tp.dtype == torch.int64


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("density", [0.05, 0.3, 0.7])
def test_count_metrics_match_sklearn(seed, density):
    pred, target = random_masks(seed, density=density)
    counts = metrics.confusion_counts(pred, target)
    results = {name: fn(counts) for name, fn in _COUNT_METRICS.items()}
    for i in range(pred.shape[0]):
        y_pred, y_true = pred[i].flatten().numpy(), target[i].flatten().numpy()
        assume_defined = y_pred.any() and y_true.any()
        assert assume_defined, "test masks are dense enough for every metric to be defined"
        assert results["dice"][i].item() == pytest.approx(f1_score(y_true, y_pred), abs=1e-12)
        assert results["iou"][i].item() == pytest.approx(jaccard_score(y_true, y_pred), abs=1e-12)
        assert results["precision"][i].item() == pytest.approx(precision_score(y_true, y_pred), abs=1e-12)
        assert results["recall"][i].item() == pytest.approx(recall_score(y_true, y_pred), abs=1e-12)
        # FPR = 1 - specificity = 1 - recall of the negative class
        expected_fpr = 1 - recall_score(~y_true, ~y_pred)
        assert results["fpr"][i].item() == pytest.approx(expected_fpr, abs=1e-12)
    assert all(value.dtype == torch.float64 for value in results.values())


NAN = math.nan


@pytest.mark.parametrize(
    ("pred_pixels", "target_pixels", "expected"),
    [
        # (dice, iou, precision, recall, fpr)
        ([], [], (1.0, 1.0, NAN, NAN, 0.0)),
        ([0], [], (0.0, 0.0, 0.0, NAN, 1 / 16)),
        ([], [0], (0.0, 0.0, NAN, 0.0, 0.0)),
        ([0, 1], [1, 2], (0.5, 1 / 3, 0.5, 0.5, 1 / 14)),
        (list(range(16)), list(range(16)), (1.0, 1.0, 1.0, 1.0, NAN)),  # no negatives
    ],
)
def test_empty_mask_conventions(pred_pixels, target_pixels, expected):
    pred = torch.zeros(16, dtype=torch.bool)
    target = torch.zeros(16, dtype=torch.bool)
    pred[pred_pixels] = True
    target[target_pixels] = True
    counts = metrics.confusion_counts(pred.reshape(1, 1, 4, 4), target.reshape(1, 1, 4, 4))
    functions = (metrics.dice, metrics.iou, metrics.precision, metrics.recall, metrics.fpr)
    got = [fn(counts).item() for fn in functions]
    for value, want in zip(got, expected):
        assert (math.isnan(value) and math.isnan(want)) or value == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_dice_is_symmetric_and_bounded(seed):
    pred, target = random_masks(seed, density=0.1 + 0.2 * seed)
    forward = metrics.dice(metrics.confusion_counts(pred, target))
    backward = metrics.dice(metrics.confusion_counts(target, pred))
    torch.testing.assert_close(forward, backward, rtol=0, atol=0)
    assert bool(((forward >= 0) & (forward <= 1)).all())


def test_group_sum_equals_pooling_by_hand():
    pred, target = random_masks(5, shape=(7, 1, 16, 16))
    counts = metrics.confusion_counts(pred, target)
    groups = torch.tensor([2, 0, 2, 1, 0, 2, 0])
    pooled = counts.group_sum(groups, num_groups=4)
    for g in range(4):
        members = groups == g
        by_hand = metrics.confusion_counts(
            pred[members].permute(1, 0, 2, 3).reshape(1, 1, -1, 16),
            target[members].permute(1, 0, 2, 3).reshape(1, 1, -1, 16),
        )
        for name in ("tp", "fp", "fn", "tn"):
            assert getattr(pooled, name)[g].item() == getattr(by_hand, name).item()
    assert pooled.tp[3].item() == pooled.tn[3].item() == 0  # an empty group has zero counts
    total = counts.sum()
    assert total.tp.item() == int((pred & target).sum())
    assert total.tn.item() == int((~pred & ~target).sum())


def test_nanmean_count_skips_nan():
    mean, n = metrics.nanmean_count(torch.tensor([1.0, NAN, 3.0], dtype=torch.float64))
    assert (mean, n) == (2.0, 2)
    mean, n = metrics.nanmean_count(torch.tensor([NAN]))
    assert math.isnan(mean) and n == 0


def ranking_case(seed: int, shape=(4, 1, 16, 16)) -> tuple[torch.Tensor, torch.Tensor]:
    """Maps where anomalous pixels tend to score higher, with ties from rounding."""
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(shape, generator=g) < 0.2
    anomaly_map = (torch.rand(shape, generator=g) + 0.7 * target).mul(20).round().div(20)
    return anomaly_map, target


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pooled_exact_ap_auroc_match_sklearn_across_batch_scales(seed):
    # One batch in [0, 1], one far above 1: torchmetrics would apply a sigmoid to the second only.
    map_a, target_a = ranking_case(seed)
    map_b, target_b = ranking_case(seed + 100)
    map_b = map_b * 37.0
    ranking = metrics.PixelRankingMetrics()
    ranking.update(map_a, target_a)
    ranking.update(map_b, target_b)
    got = ranking.compute()
    scores = torch.cat([map_a.flatten(), map_b.flatten()]).numpy()
    labels = torch.cat([target_a.flatten(), target_b.flatten()]).numpy()
    assert got["ap"] == pytest.approx(average_precision_score(labels, scores), abs=1e-6)
    assert got["auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
def test_binned_ap_close_to_exact(seed):
    anomaly_map, target = ranking_case(seed, shape=(8, 1, 32, 32))
    jitter = torch.rand(anomaly_map.shape, generator=torch.Generator().manual_seed(seed))
    anomaly_map = anomaly_map + 0.01 * jitter  # break most ties
    exact = metrics.pixel_ranking(anomaly_map, target)
    binned = metrics.pixel_ranking(anomaly_map, target, thresholds=500, map_max=float(anomaly_map.max()))
    assert binned["ap"] == pytest.approx(exact["ap"], abs=0.01)
    assert binned["auroc"] == pytest.approx(exact["auroc"], abs=0.01)


def test_binned_mode_warns_about_clipped_pixels(caplog):
    anomaly_map, target = ranking_case(3)
    with caplog.at_level(logging.WARNING, logger="synomaly.metrics"):
        metrics.pixel_ranking(anomaly_map, target, thresholds=50, map_max=0.5)
    assert "exceed map_max" in caplog.text


@pytest.mark.parametrize(("thresholds", "map_max"), [(100, None), (100, 0.0), (1, 1.0), (True, 1.0)])
def test_binned_mode_needs_valid_settings(thresholds, map_max):
    with pytest.raises(ConfigError):
        metrics.PixelRankingMetrics(thresholds, map_max)


def test_per_image_ap_matches_sklearn_and_is_nan_without_target():
    anomaly_map, target = ranking_case(7, shape=(5, 1, 16, 16))
    target[2] = False
    ap = metrics.per_image_average_precision(anomaly_map * 3.0, target)
    assert math.isnan(ap[2].item())
    for i in (0, 1, 3, 4):
        expected = average_precision_score(target[i].flatten().numpy(), anomaly_map[i].flatten().numpy())
        assert ap[i].item() == pytest.approx(expected, abs=1e-6)


def test_image_ranking_matches_sklearn():
    g = torch.Generator().manual_seed(0)
    labels = torch.rand(40, generator=g) < 0.5
    scores = torch.randn(40, generator=g) * 50 + 30 * labels  # negative and > 1 values
    assert metrics.image_auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-6)
    expected_ap = average_precision_score(labels, scores)
    assert metrics.image_average_precision(scores, labels) == pytest.approx(expected_ap, abs=1e-6)


@pytest.mark.parametrize("all_anomalous", [False, True])
def test_single_class_gives_nan_and_a_warning(caplog, all_anomalous):
    labels = torch.full((6,), all_anomalous)
    with caplog.at_level(logging.WARNING, logger="synomaly.metrics"):
        value = metrics.image_auroc(torch.arange(6.0), labels)
    assert math.isnan(value)
    assert "image-level AUROC" in caplog.text
    caplog.clear()
    target = torch.full((2, 1, 8, 8), all_anomalous)
    with caplog.at_level(logging.WARNING, logger="synomaly.metrics"):
        pooled = metrics.pixel_ranking(torch.rand(2, 1, 8, 8), target)
    assert math.isnan(pooled["ap"]) and math.isnan(pooled["auroc"])
    assert "pixel-level" in caplog.text


def hd95_oracle(pred: np.ndarray, target: np.ndarray, spacing=(1.0, 1.0)) -> float:
    """MedPy's hd95 by brute force: pairwise distances between edge pixels, union, 95th percentile."""
    edge_p = pred & ~ndimage.binary_erosion(pred)
    edge_t = target & ~ndimage.binary_erosion(target)
    points_p = np.argwhere(edge_p) * np.asarray(spacing)
    points_t = np.argwhere(edge_t) * np.asarray(spacing)
    pairwise = np.sqrt(((points_p[:, None, :] - points_t[None, :, :]) ** 2).sum(-1))
    return float(np.percentile(np.concatenate([pairwise.min(1), pairwise.min(0)]), 95))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("spacing", [None, (1.0, 1.0), (0.5, 2.0)])
def test_hd95_matches_brute_force_oracle(seed, spacing):
    pred, target = blob_masks(seed), blob_masks(seed + 10)
    assert bool(pred[:, 0, 0, :].any() or pred[:, 0, :, 0].any()), "some blob touches the border"
    got = metrics.hd95(pred, target, spacing=spacing)
    for i in range(pred.shape[0]):
        expected = hd95_oracle(pred[i, 0].numpy(), target[i, 0].numpy(), spacing or (1.0, 1.0))
        assert got[i].item() == pytest.approx(expected, rel=1e-5, abs=1e-5)


def test_hd95_hand_example_and_empty_masks():
    pred = torch.zeros(3, 1, 16, 16, dtype=torch.bool)
    target = torch.zeros(3, 1, 16, 16, dtype=torch.bool)
    target[0, 0, 8:12, 8:12] = True
    pred[0, 0, 8:12, 8:10] = True  # union of distances: 12 zeros, 4 ones, 4 twos -> P95 = 2
    target[1, 0, 2:5, 2:5] = True  # empty prediction
    pred[2, 0, 2:5, 2:5] = True  # empty target
    got = metrics.hd95(pred, target)
    assert got[0].item() == pytest.approx(2.0)
    assert math.isnan(got[1].item()) and math.isnan(got[2].item())


@pytest.mark.filterwarnings("ignore:.*always_return_as_numpy.*:FutureWarning")
def test_hd95_pools_directions_unlike_monai_max_of_percentiles():
    from monai.metrics import compute_hausdorff_distance

    pred = torch.zeros(1, 1, 32, 32, dtype=torch.bool)
    target = torch.zeros(1, 1, 32, 32, dtype=torch.bool)
    target[0, 0, 2:5, 2:5] = True
    pred[0, 0, 2:5, 2:5] = True
    pred[0, 0, :, 30] = True  # a far line: only the pred -> target direction sees it
    ours = metrics.hd95(pred, target).item()
    monai_value = compute_hausdorff_distance(
        pred.float(), target.float(), include_background=True, percentile=95
    )
    assert ours == pytest.approx(hd95_oracle(pred[0, 0].numpy(), target[0, 0].numpy()), rel=1e-6)
    assert ours < monai_value.item() - 0.1


@pytest.mark.parametrize(("height", "width"), [(16, 16), (32, 48), (64, 40)])
def test_ssim_matches_skimage(height, width):
    from skimage.metrics import structural_similarity

    g = torch.Generator().manual_seed(height + width)
    image = torch.rand(3, 1, height, width, generator=g) * 2 - 1
    smooth = torch.from_numpy(ndimage.gaussian_filter(image.numpy(), sigma=(0, 0, 1, 1)))
    reconstruction = (smooth + 0.1 * torch.randn(image.shape, generator=g)).clamp(-1, 1)
    got = metrics.ssim(image, reconstruction)
    for i in range(3):
        expected = structural_similarity(
            image[i, 0].double().numpy(),
            reconstruction[i, 0].double().numpy(),
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            data_range=2.0,
        )
        assert got[i].item() == pytest.approx(expected, abs=1e-4)
    assert metrics.ssim(image, image).tolist() == pytest.approx([1.0] * 3, abs=1e-5)


def hand_cases() -> dict[str, torch.Tensor]:
    """Five 16x16 cases whose metrics are computed by hand in the evaluator test."""
    target = torch.zeros(5, 1, 16, 16, dtype=torch.bool)
    pred = torch.zeros_like(target)
    target[0, 0, 2:6, 2:6] = pred[0, 0, 2:6, 2:6] = True  # a: perfect
    target[1, 0, 8:12, 8:12] = True  # b: half found
    pred[1, 0, 8:12, 8:10] = True
    target[2, 0, 4:8, 4:8] = True  # c: missed
    pred[3, 0, 0, 0:4] = True  # d: healthy, 4 false positives; e: healthy, clean
    anomaly_map = 0.9 * target.float()
    anomaly_map[3, 0, 0, 0:4] = 0.95  # the only pixels outranking the anomalies
    g = torch.Generator().manual_seed(0)
    image = torch.rand(5, 1, 16, 16, generator=g) * 2 - 1
    reconstruction = image.clone()
    reconstruction[:3] = torch.rand(3, 1, 16, 16, generator=g) * 2 - 1
    return {"anomaly_map": anomaly_map, "pred": pred, "target": target, "image": image, "rec": reconstruction}


def run_evaluator(evaluator: metrics.SegmentationEvaluator) -> dict:
    cases = hand_cases()
    groups = ["p1", "p1", "p2", "p2", "p3"]
    for batch in (slice(0, 3), slice(3, 5)):
        evaluator.update(
            cases["anomaly_map"][batch],
            cases["pred"][batch],
            cases["target"][batch],
            case_ids=["a", "b", "c", "d", "e"][batch],
            group_ids=groups[batch],
            score=cases["pred"][batch].flatten(1).sum(1).float(),  # mask area
            image=cases["image"][batch],
            reconstruction=cases["rec"][batch],
        )
    return evaluator.compute()


@pytest.mark.parametrize(("ap_thresholds", "map_max"), [(None, None), (101, 1.0)])
def test_evaluator_end_to_end_hand_computed(ap_thresholds, map_max):
    result = run_evaluator(metrics.SegmentationEvaluator(ap_thresholds=ap_thresholds, map_max=map_max))
    agg = result["aggregate"]
    assert (agg["n_cases"], agg["n_anomalous"], agg["n_healthy"]) == (5, 3, 2)
    assert agg["dice_mean"] == pytest.approx((1 + 2 / 3 + 0) / 3) and agg["dice_mean_n"] == 3
    assert agg["iou_mean"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert agg["precision_mean"] == pytest.approx(1.0) and agg["precision_mean_n"] == 2  # c predicts nothing
    assert agg["recall_mean"] == pytest.approx(0.5)
    assert agg["fpr_mean"] == 0.0
    assert agg["fpr_healthy_mean"] == pytest.approx(2 / 256)
    # pooled: tp = 16 + 8, fp = 4, fn = 8 + 16
    assert agg["dice_pooled"] == pytest.approx(48 / 76)
    assert agg["iou_pooled"] == pytest.approx(24 / 52)
    assert agg["hd95_mean"] == pytest.approx(1.0) and agg["hd95_mean_n"] == 2  # (0 + 2) / 2
    assert agg["hd95_empty_predictions"] == 1
    # 4 negatives at 0.95 above 48 positives at 0.9, 1232 negatives in all
    assert agg["ap"] == pytest.approx(48 / 52, abs=1e-6)
    assert agg["auroc_pixel"] == pytest.approx(1 - 4 / 1232, abs=1e-6)
    assert agg["ap_mean"] == pytest.approx(1.0) and agg["ap_mean_n"] == 3
    # areas 16, 8, 0 (anomalous) vs 4, 0 (healthy): 4.5 of 6 pairs won
    assert agg["auroc_image"] == pytest.approx(0.75, abs=1e-6)
    assert agg["ssim_healthy"] == pytest.approx(1.0, abs=1e-5) and agg["ssim_healthy_n"] == 2
    # volumes: p1 tp 24 fp 0 fn 8 -> 6/7; p2 tp 0 -> 0; p3 healthy, left out of the mean
    assert agg["dice_volume_mean"] == pytest.approx(3 / 7)
    assert (agg["n_volumes"], agg["n_volumes_anomalous"]) == (3, 2)


def test_evaluator_per_case_and_per_volume_rows_are_json_safe():
    result = run_evaluator(metrics.SegmentationEvaluator())
    restored = json.loads(json.dumps(result))
    cases = {row["case_id"]: row for row in restored["per_case"]}
    assert cases["b"]["dice"] == pytest.approx(2 / 3) and cases["b"]["hd95"] == pytest.approx(2.0)
    assert cases["b"]["group_id"] == "p1" and cases["b"]["anomalous"] is True
    assert math.isnan(cases["c"]["precision"]) and math.isnan(cases["c"]["hd95"])
    assert math.isnan(cases["d"]["recall"]) and math.isnan(cases["d"]["ap"])
    assert cases["d"]["anomalous"] is False
    assert cases["e"]["dice"] == 1.0 and cases["e"]["score"] == 0.0
    assert (cases["a"]["tp"], cases["d"]["fp"], cases["e"]["tn"]) == (16, 4, 256)
    volumes = {row["group_id"]: row for row in restored["per_volume"]}
    assert volumes["p1"]["dice"] == pytest.approx(6 / 7) and volumes["p1"]["n_slices"] == 2
    assert volumes["p2"]["n_anomalous_slices"] == 1 and volumes["p3"]["anomalous"] is False
    assert isinstance(result["aggregate"]["dice_mean"], float)


def test_evaluator_without_optional_inputs():
    cases = hand_cases()
    evaluator = metrics.SegmentationEvaluator()
    evaluator.update(cases["anomaly_map"], cases["pred"], cases["target"])
    result = evaluator.compute()
    assert "per_volume" not in result and "auroc_image" not in result["aggregate"]
    assert math.isnan(result["aggregate"]["ssim_healthy"]) and result["aggregate"]["ssim_healthy_n"] == 0
    assert result["per_case"][0]["ssim"] is None and result["per_case"][0]["case_id"] == "0"


@pytest.mark.parametrize(
    "second_update",
    [
        {"score": torch.zeros(5)},
        {"group_ids": ["x"] * 5},
        {"image": torch.zeros(5, 1, 16, 16)},
    ],
)
def test_evaluator_rejects_inconsistent_updates(second_update):
    cases = hand_cases()
    evaluator = metrics.SegmentationEvaluator()
    evaluator.update(cases["anomaly_map"], cases["pred"], cases["target"])
    with pytest.raises(ValueError):
        evaluator.update(cases["anomaly_map"], cases["pred"], cases["target"], **second_update)
    assert len(evaluator.compute()["per_case"]) == 5  # the rejected batch left no trace


EMPTY = torch.zeros(1, 1, 4, 4, dtype=torch.bool)


@pytest.mark.parametrize(
    ("anomaly_map", "pred", "target"),
    [
        (-torch.ones(1, 1, 4, 4), EMPTY, EMPTY),  # negative map
        (torch.full((1, 1, 4, 4), NAN), EMPTY, EMPTY),  # NaN map
        (torch.zeros(1, 1, 4, 4), EMPTY.float(), EMPTY),  # float prediction
        (torch.zeros(1, 1, 4, 4), EMPTY, EMPTY.float()),  # float target
        (torch.zeros(1, 1, 4, 4), EMPTY, torch.zeros(1, 1, 4, 5, dtype=torch.bool)),  # shape mismatch
    ],
)
def test_evaluator_rejects_bad_inputs(anomaly_map, pred, target):
    with pytest.raises(ValueError):
        metrics.SegmentationEvaluator().update(anomaly_map, pred, target)


def test_exact_mode_keeps_its_own_copy_of_the_maps():
    anomaly_map, target = ranking_case(4)
    expected = metrics.pixel_ranking(anomaly_map, target)
    ranking = metrics.PixelRankingMetrics()
    ranking.update(anomaly_map, target)
    anomaly_map.zero_()  # a caller reusing its buffer must not change the result
    target.zero_()
    assert ranking.compute() == pytest.approx(expected)
