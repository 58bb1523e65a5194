"""Lesion tables: 3-D components of volumes in mL and world millimetres, 2-D components of images in mm^2."""

from __future__ import annotations

import csv
import json

import nibabel
import numpy as np
import pytest
from scipy import ndimage

from synomaly.lesions import slice_lesions, volume_lesions


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
