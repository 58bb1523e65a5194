"""Per-volume evaluation: 3-D Dice, lesion-wise sensitivity, false-positive lesions and lesion-volume error."""

from __future__ import annotations

import csv
import math

import nibabel
import numpy as np
import pytest
import torch

from synomaly.metrics import SegmentationEvaluator, VolumeLesions

SIZE = 8


def _slices(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(n, 1, SIZE, SIZE, dtype=torch.bool), torch.zeros(n, 1, SIZE, SIZE, dtype=torch.bool)


def _three_volumes() -> tuple[torch.Tensor, torch.Tensor, list[str], list[int]]:
    """Volume a (slices 1-4, given out of order), b (slices 10 and 12: a gap) and c (one healthy slice).

    a: reference lesions L1 (slices 1-3, 2x2: 12 voxels) and L2 (slice 4, 4 voxels); the prediction
    hits L1 on slice 2 only (4 voxels) and has a 4-voxel lesion of its own on slice 1.
    b: the same 2x2 square on slices 10 and 12, predicted exactly: two lesions, the gap splits them.
    c: healthy, one predicted voxel.
    """
    pred, ref = _slices(7)
    groups = ["a", "a", "a", "a", "b", "b", "c"]
    positions = [3, 1, 4, 2, 12, 10, 0]
    for i, position in enumerate(positions[:4]):
        if position <= 3:
            ref[i, 0, 2:4, 2:4] = True
        if position == 4:
            ref[i, 0, 6:8, 6:8] = True
        if position == 2:
            pred[i, 0, 2:4, 2:4] = True
        if position == 1:
            pred[i, 0, 6:8, 0:2] = True
    ref[4:6, 0, 2:4, 2:4] = pred[4:6, 0, 2:4, 2:4] = True
    pred[6, 0, 0, 0] = True
    return pred, ref, groups, positions


def _evaluate(pred, ref, groups, positions, voxel_ml, batches=((0, 3), (3, 7))):
    evaluator = SegmentationEvaluator()
    for start, stop in batches:  # volume a arrives in two batches
        evaluator.update(pred[start:stop].float(), pred[start:stop], ref[start:stop], group_ids=groups[start:stop],
                         slice_positions=positions[start:stop], voxel_ml=voxel_ml[start:stop])
    return evaluator.compute()


def test_lesion_metrics_of_hand_built_volumes():
    pred, ref, groups, positions = _three_volumes()
    metrics = _evaluate(pred, ref, groups, positions, [0.002] * 7)
    rows = {row["group_id"]: row for row in metrics["per_volume"]}
    a, b, c = rows["a"], rows["b"], rows["c"]
    assert (a["ref_lesions"], a["detected_lesions"], a["pred_lesions"], a["fp_lesions"]) == (2, 1, 2, 1)
    assert a["lesion_sensitivity"] == 0.5 and (a["ref_voxels"], a["pred_voxels"]) == (16, 8)
    assert a["dice"] == pytest.approx(2 * 4 / (8 + 16))  # the 3-D Dice: counts pooled over the volume
    assert a["volume_error_ml"] == pytest.approx((8 - 16) * 0.002) and a["ref_ml"] == pytest.approx(0.032)
    assert (b["ref_lesions"], b["detected_lesions"], b["fp_lesions"], b["dice"]) == (2, 2, 0, 1.0)
    assert (c["ref_lesions"], c["fp_lesions"]) == (0, 1) and math.isnan(c["lesion_sensitivity"])
    agg = metrics["aggregate"]
    assert agg["lesion_sensitivity"] == pytest.approx(3 / 4) and agg["lesion_sensitivity_n"] == 4
    assert agg["fp_lesions_per_volume"] == pytest.approx(2 / 3)
    assert agg["lesion_volume_unit"] == "ml"
    assert agg["lesion_volume_error_mean"] == pytest.approx((-8 + 0 + 1) * 0.002 / 3)
    assert agg["lesion_volume_abs_error_mean"] == pytest.approx((8 + 0 + 1) * 0.002 / 3)
    assert agg["dice_volume_mean"] == pytest.approx((1 / 3 + 1) / 2) and agg["n_volumes"] == 3
    assert metrics["settings"]["volume_connectivity"] == 1


def test_one_unknown_voxel_size_gives_errors_in_voxels():
    pred, ref, groups, positions = _three_volumes()
    agg = _evaluate(pred, ref, groups, positions, [0.002] * 6 + [None])["aggregate"]
    assert agg["lesion_volume_unit"] == "voxels"
    assert agg["lesion_volume_error_mean"] == pytest.approx(-7 / 3) and agg["lesion_volume_abs_error_mean"] == pytest.approx(3)


def test_slice_order_comes_from_positions_and_arrival_order_without_them():
    pred, ref = _slices(3)
    ref[0, 0, 0:2, 0:2] = True  # slice 2: the lesion
    pred[1, 0, 0:2, 0:2] = True  # slice 1: right below it
    pred[2, 0, 4:6, 4:6] = True  # slice 3, elsewhere
    volumes = VolumeLesions()
    volumes.update(pred, ref, positions=[2, 1, 3])
    rows, _ = volumes.compute(["v"] * 3)
    assert (rows[0]["pred_lesions"], rows[0]["detected_lesions"], rows[0]["fp_lesions"]) == (2, 0, 2)  # no voxel inside
    extended = pred.clone()
    extended[0, 0, 0, 0] = True  # now one predicted voxel lies in the lesion, joining the slice below
    volumes.reset()
    volumes.update(extended, ref, positions=[2, 1, 3])
    rows, _ = volumes.compute(["v"] * 3)
    assert (rows[0]["pred_lesions"], rows[0]["detected_lesions"], rows[0]["fp_lesions"]) == (2, 1, 1)
    volumes.reset()
    volumes.update(pred, ref)  # arrival order 0, 1, 2: the same slices, stacked as given
    rows, agg = volumes.compute(["v"] * 3)
    assert rows[0]["pred_lesions"] == 2 and rows[0]["voxel_ml"] is None and agg["lesion_volume_unit"] == "voxels"


def test_connectivity_across_slices_and_refusals():
    pred, ref = _slices(2)
    ref[0, 0, 1, 1] = ref[1, 0, 2, 1] = True  # next slice, one row down: neighbours along an edge only
    pred[:] = ref
    for connectivity, lesions in ((1, 2), (2, 1)):
        volumes = VolumeLesions(connectivity)
        volumes.update(pred, ref)
        assert volumes.compute(["v", "v"])[0][0]["ref_lesions"] == lesions
    volumes = VolumeLesions()
    volumes.update(pred, ref, positions=[5, 5])
    with pytest.raises(ValueError, match="volume 'v' has slice 5 more than once"):
        volumes.compute(["v", "v"])
    with pytest.raises(ValueError, match="2 positions for a batch of 1"):
        VolumeLesions().update(pred[:1], ref[:1], positions=[1, 2])
    evaluator = SegmentationEvaluator()
    with pytest.raises(ValueError, match="need group_ids"):
        evaluator.update(pred.float(), pred, ref, slice_positions=[0, 1])
    assert not evaluator._counts  # nothing kept from the refused batch


def _write_bundle(path):
    """Two patients whose healthy and tumour slices sit in two arrays (as lgg_flair's), 32x32, 0..255."""
    anomalous, masks, healthy = (np.zeros((n, 32, 32), dtype=np.uint8) for n in (3, 3, 2))
    masks[0:2, 4:8, 4:8] = 1  # p1, slices 5 and 6: one lesion of 32 pixels
    anomalous[0, 4:8, 4:8] = 255  # found on slice 5 only
    healthy[0, 4:8, 4:8] = 255  # and on the healthy slice 4 below it: the same predicted lesion
    masks[2, 20:24, 20:24] = 1  # p2, slice 3: missed
    healthy[1, 10:12, 10:12] = 255  # p2, slice 4: a false-positive lesion of 4 pixels
    np.savez(path, test_anomalous=anomalous, test_masks=masks, test_healthy=healthy,
             test_anomalous_ids=np.array(["p1", "p1", "p2"]), test_anomalous_slice=np.array([5, 6, 3], dtype=np.int16),
             test_healthy_ids=np.array(["p1", "p2"]), test_healthy_slice=np.array([4, 4], dtype=np.int16))


EXACT = {"kernel": 1, "threshold": 0.5, "min_size": 0}


def test_evaluate_stacks_a_bundles_slices_by_patient_and_slice_number(intensity_model, tmp_path):
    from synomaly.commands import run_evaluate

    bundle = tmp_path / "b.npz"
    _write_bundle(bundle)
    metrics = run_evaluate(intensity_model, [f"{bundle}:test_anomalous", f"{bundle}:test_healthy"],
                           [f"{bundle}:test_masks", "none"], tmp_path / "eval", detect=EXACT, device="cpu")
    rows = {row["group_id"]: row for row in metrics["per_volume"]}
    assert (rows["p1"]["detected_lesions"], rows["p1"]["fp_lesions"], rows["p1"]["pred_lesions"]) == (1, 0, 1)
    assert rows["p1"]["dice"] == pytest.approx(0.5) and rows["p1"]["n_slices"] == 3
    assert (rows["p2"]["detected_lesions"], rows["p2"]["fp_lesions"], rows["p2"]["ref_voxels"]) == (0, 1, 16)
    agg = metrics["aggregate"]
    assert agg["lesion_sensitivity"] == 0.5 and agg["fp_lesions_per_volume"] == 0.5 and agg["lesion_volume_unit"] == "voxels"
    assert agg["lesion_volume_error_mean"] == pytest.approx((0 - 12) / 2) and agg["lesion_volume_abs_error_mean"] == 6
    assert agg["dice_volume_mean"] == pytest.approx(0.25)
    with open(tmp_path / "eval" / "per_volume.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["fp_lesions"] for r in table] == ["0", "1"] and table[0]["volume_error_ml"] == ""


def test_evaluate_gives_lesion_volumes_of_a_nifti_in_ml_on_the_models_grid(intensity_model, tmp_path):
    from synomaly.commands import run_evaluate

    image, mask = np.zeros((64, 64, 6), dtype=np.float32), np.zeros((64, 64, 6), dtype=np.uint8)
    image[8:16, 8:16, 1:4] = 255  # 8x8x3 voxels: 4x4x3 = 48 voxels at the model's 32 px
    mask[8:16, 8:16, 1:5] = 1  # the reference lesion goes one slice further: 64 model voxels
    image[40:44, 40:44, 5] = 255  # a false-positive lesion: 2x2 = 4 model voxels
    affine = np.diag([0.9, 0.9, 3.0, 1.0])
    nibabel.save(nibabel.Nifti1Image(image, affine), tmp_path / "scan.nii.gz")
    nibabel.save(nibabel.Nifti1Image(mask, affine), tmp_path / "mask.nii.gz")
    metrics = run_evaluate(intensity_model, [str(tmp_path / "scan.nii.gz")], [str(tmp_path / "mask.nii.gz")],
                           tmp_path / "eval", detect=EXACT, device="cpu")
    (row,) = metrics["per_volume"]
    model_voxel_ml = 1.8 * 1.8 * 3.0 / 1000  # 64 px shrunk to 32: each model voxel covers 2x2 input voxels
    assert row["voxel_ml"] == pytest.approx(model_voxel_ml)
    assert (row["ref_voxels"], row["pred_voxels"], row["detected_lesions"], row["fp_lesions"]) == (64, 52, 1, 1)
    assert row["ref_ml"] == pytest.approx(64 * model_voxel_ml)  # 0.622 mL: 8x8x4 voxels of 0.9 x 0.9 x 3 mm
    assert metrics["aggregate"]["lesion_volume_unit"] == "ml"
    assert metrics["aggregate"]["lesion_volume_error_mean"] == pytest.approx((52 - 64) * model_voxel_ml)


def test_files_of_one_name_in_two_folders_are_two_volumes(intensity_model, tmp_path):
    from synomaly.commands import run_evaluate

    for patient in ("p1", "p2"):
        (tmp_path / patient).mkdir()
        volume = np.zeros((32, 32, 2), dtype=np.float32)
        volume[4:8, 4:8, :] = 255
        nibabel.save(nibabel.Nifti1Image(volume, np.eye(4)), tmp_path / patient / "flair.nii.gz")
        nibabel.save(nibabel.Nifti1Image((volume > 0).astype(np.uint8), np.eye(4)), tmp_path / patient / "mask.nii.gz")
    metrics = run_evaluate(intensity_model, [str(tmp_path / p / "flair.nii.gz") for p in ("p1", "p2")],
                           [str(tmp_path / p / "mask.nii.gz") for p in ("p1", "p2")], tmp_path / "eval", detect=EXACT,
                           device="cpu")
    assert [row["group_id"] for row in metrics["per_volume"]] == [str(tmp_path / p / "flair.nii.gz") for p in ("p1", "p2")]
    assert metrics["aggregate"]["lesion_sensitivity"] == 1.0 and metrics["aggregate"]["lesion_sensitivity_n"] == 2
