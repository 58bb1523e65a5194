"""Lesion tables: 3-D components of volumes in mL and world millimetres, 2-D components of images in mm^2."""

from __future__ import annotations

import csv
import json

import nibabel
import numpy as np
import pytest
from scipy import ndimage

from synomaly.errors import ConfigError, OutputExistsError
from synomaly.lesions import MinVolume, remove_small_lesions, slice_lesions, volume_lesions


def test_volume_lesions_in_ml_and_world_millimetres():
    mask = np.zeros((20, 30, 10), dtype=bool)
    mask[2:6, 3:7, 1:3] = True  # 32 voxels
    mask[10:15, 10:20, 4:8] = True  # 200 voxels
    amap = np.where(mask, 0.3, 0.0)
    amap[12, 15, 5] = 0.9
    # Axes permuted and oblique (voxel axis i runs along y, j along x and z), 0.5 x 0.5 x 2 mm voxels.
    c, s = np.cos(0.3), np.sin(0.3)
    affine = np.array([[0, -0.5 * c, 2.0 * s, 40.0], [0.5, 0, 0, -20.0], [0, 0.5 * s, 2.0 * c, 5.0], [0, 0, 0, 1]])
    rows = volume_lesions(mask, amap, affine)
    assert [r["voxels"] for r in rows] == [200, 32] and [r["lesion"] for r in rows] == [1, 2]  # largest first
    assert rows[0]["volume_ml"] == pytest.approx(200 * 0.5 * 0.5 * 2 / 1000)
    centre = np.array([12.0, 14.5, 5.5])  # voxel centre of mass of the large box
    expected = affine[:3, :3] @ centre + affine[:3, 3]
    assert [rows[0][k] for k in ("x_mm", "y_mm", "z_mm")] == pytest.approx(list(expected), abs=1e-3)  # mm, 3 decimals
    assert [rows[0][k] for k in ("i0", "i1", "j0", "j1", "k0", "k1")] == [10, 15, 10, 20, 4, 8]
    assert rows[0]["map_max"] == pytest.approx(0.9) and rows[1]["map_mean"] == pytest.approx(0.3)
    assert volume_lesions(np.zeros((4, 4, 4)), np.zeros((4, 4, 4)), np.eye(4)) == []


def test_slice_lesions_never_join_slices_and_give_mm2_only_with_a_spacing():
    mask = np.zeros((2, 16, 16), dtype=bool)
    mask[:, 4:8, 4:8] = True  # the same square on both slices: two lesions, not one
    mask[1, 10:12, 10:15] = True
    rows = slice_lesions(mask, mask.astype(float), (0.8, 0.5))
    assert [(r["slice"], r["pixels"]) for r in rows] == [(0, 16), (1, 16), (1, 10)]
    assert rows[2]["area_mm2"] == pytest.approx(10 * 0.4) and (rows[2]["row"], rows[2]["col"]) == (10.5, 12.0)
    assert all(r["area_mm2"] is None for r in slice_lesions(mask, mask.astype(float), None))


def test_detect_writes_a_lesion_table_that_matches_its_nifti_mask(tiny_model_dir, phantom_test, tmp_path):
    from synomaly.commands import run_detect

    _, lesioned, _ = phantom_test
    volume = np.stack([((x[0].numpy() + 1) * 100) for x in lesioned[:6]], axis=-1).astype(np.float32)
    affine = np.diag([0.9, 0.9, 3.0, 1.0])
    affine[:3, 3] = [-10, 20, 30]
    nibabel.save(nibabel.Nifti1Image(volume, affine), tmp_path / "scan.nii.gz")
    summary = run_detect(tiny_model_dir, [str(tmp_path / "scan.nii.gz")], tmp_path / "out", device="cpu",
                         detect={"threshold": 0.05, "min_size": 1})
    case = summary["cases"][0]
    folder = tmp_path / "out" / case["output"]
    written = nibabel.load(folder / "mask.nii.gz")
    mask = np.asanyarray(written.dataobj).astype(bool)
    labels, count = ndimage.label(mask, structure=ndimage.generate_binary_structure(3, 1))
    with open(folder / "lesions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert count > 0 and case["lesions"]["count"] == count == len(rows)
    # The largest lesion lies where the mask's largest component lies in the world, computed independently.
    sizes = np.bincount(labels.ravel())[1:]
    centre = np.argwhere(labels == sizes.argmax() + 1).mean(0)
    world = written.affine[:3, :3] @ centre + written.affine[:3, 3]
    assert [float(rows[0][k]) for k in ("x_mm", "y_mm", "z_mm")] == pytest.approx(list(world), abs=1e-3)
    assert sum(int(r["voxels"]) for r in rows) == mask.sum()
    assert case["lesions"]["total_ml"] == pytest.approx(mask.sum() * 0.9 * 0.9 * 3.0 / 1000, rel=1e-5)
    assert json.loads((folder / "case.json").read_text())["lesions"]["coordinates"].startswith("RAS+")


def test_min_volume_reads_a_size_with_its_unit_and_converts_it_to_voxels():
    assert MinVolume.parse("10mm3") == MinVolume(10.0, "mm3") and str(MinVolume.parse(" 0.05 ML ")) == "0.05ml"
    assert MinVolume.parse("8voxels") == MinVolume.parse("8 voxel") == MinVolume(8.0, "voxels")
    voxel = 0.9 * 0.9 * 3.0  # 2.43 mm^3
    assert MinVolume.parse("30mm3").voxels(voxel) == 13  # 30 / 2.43 = 12.3: a kept lesion has 13 voxels or more
    assert MinVolume.parse("4.86mm3").voxels(voxel) == 2  # exactly two voxels, whatever the float rounding
    assert MinVolume.parse("0.0486ml").voxels(voxel) == 20 and MinVolume.parse("7.5voxels").voxels(voxel) == 8
    for bad in ("10", "10 cm3", "-5mm3", "mm3", ""):
        with pytest.raises(ConfigError, match="--min-volume: expected a size and its unit"):
            MinVolume.parse(bad)


def test_remove_small_lesions_counts_voxels_across_slices():
    mask = np.zeros((12, 12, 8), dtype=bool)
    mask[1:3, 1:3, 0:2] = True  # 8 voxels
    mask[6, 6:8, 0:8] = True  # 2 voxels per slice, 16 across eight slices
    mask[9:12, 9:12, 3:5] = True  # 18 voxels
    kept, dropped = remove_small_lesions(mask, 13)
    assert dropped == 1 and kept.sum() == 34 and not kept[1:3, 1:3, 0:2].any()
    edge = np.zeros((4, 4, 2), dtype=bool)
    edge[0, 0, 0] = edge[1, 0, 1] = True  # neighbours on the next slice along an edge only: two lesions with faces, one with edges
    assert remove_small_lesions(edge, 2, connectivity=1)[1] == 2 and remove_small_lesions(edge, 2, connectivity=2)[1] == 0
    same, none = remove_small_lesions(mask, 1)
    assert none == 0 and np.array_equal(same, mask)


def test_detect_min_volume_drops_small_3d_lesions_of_an_anisotropic_volume(intensity_model, tmp_path):
    from synomaly.commands import run_detect

    volume = np.zeros((32, 32, 10), dtype=np.float32)
    volume[2:4, 2:4, 0:2] = 255  # 8 voxels = 19.44 mm^3: below 30 mm^3
    volume[10, 10:12, 1:9] = 255  # 2 voxels per slice (below any 2-D limit of 3 px), 16 in 3-D = 38.88 mm^3: kept
    volume[20:23, 20:23, 4:6] = 255  # 18 voxels = 43.74 mm^3: kept
    volume[28:30, 5:7, 7:9] = 255  # 8 voxels: below
    affine = np.diag([0.9, 0.9, 3.0, 1.0])
    nibabel.save(nibabel.Nifti1Image(volume, affine), tmp_path / "scan.nii.gz")
    settings = {"kernel": 1, "threshold": 0.5, "min_size": 0}
    summary = run_detect(intensity_model, [str(tmp_path / "scan.nii.gz")], tmp_path / "out", device="cpu", detect=settings,
                         min_volume="30mm3")
    case = summary["cases"][0]
    folder = tmp_path / "out" / case["output"]
    with open(folder / "lesions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["voxels"]) for r in rows] == [18, 16]
    assert [float(r["volume_ml"]) for r in rows] == pytest.approx([18 * 2.43 / 1000, 16 * 2.43 / 1000])
    mask = np.asanyarray(nibabel.load(folder / "mask.nii.gz").dataobj).astype(bool)
    assert mask.sum() == 34 and mask[20:23, 20:23, 4:6].all() and not mask[2:4, 2:4].any()
    assert case["lesions"]["min_volume"] == {"given": "30mm3", "voxels": 13, "voxel_mm3": 2.43, "dropped": 2}
    assert case["lesions"]["total_ml"] == pytest.approx(34 * 2.43 / 1000)
    assert sum(case["area_px"]) == 34  # the score (flagged area in mm^2 per slice) loses them too
    assert case["score_unit"].startswith("mm^2") and sum(case["score"]) == pytest.approx(34 * 0.9 * 0.9)
    assert summary["min_volume"] == "30mm3" and summary["made_with"]["min_volume"] == "30mm3"
    # Without the option the four lesions stay, and the folder made with it is not mixed with this run.
    plain = run_detect(intensity_model, [str(tmp_path / "scan.nii.gz")], tmp_path / "plain", device="cpu", detect=settings)
    assert plain["cases"][0]["lesions"]["count"] == 4 and "min_volume" not in plain["made_with"]
    with pytest.raises(OutputExistsError, match="min_volume"):
        run_detect(intensity_model, [str(tmp_path / "scan.nii.gz")], tmp_path / "out", device="cpu", detect=settings,
                   min_volume="8voxels")


def test_cli_detect_takes_min_volume_and_refuses_a_size_without_unit(intensity_model, tmp_path, capsys):
    from synomaly.cli import main

    volume = np.zeros((32, 32, 4), dtype=np.float32)
    volume[4:8, 4:8, 0:2] = 255  # 32 voxels of 2 mm^3
    volume[20, 20, 3] = 255  # 1 voxel
    nibabel.save(nibabel.Nifti1Image(volume, np.diag([1.0, 1.0, 2.0, 1.0])), tmp_path / "scan.nii.gz")
    base = ["--quiet", "detect", str(tmp_path / "scan.nii.gz"), "-m", str(intensity_model), "--device", "cpu",
            "--kernel", "1", "--threshold", "0.5", "--min_size", "0"]
    assert main([*base, "-o", str(tmp_path / "bad"), "--min-volume", "10"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "synomaly detect: error: --min-volume: expected a size and its unit, e.g. 10mm3, 0.05ml or 8voxels; got '10'"]
    assert main([*base, "-o", str(tmp_path / "out"), "--min-volume", "0.01ml"]) == 0  # 10 mm^3: 5 voxels
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["cases"][0]["lesions"]["count"] == 1 and summary["cases"][0]["lesions"]["min_volume"]["voxels"] == 5
