"""The whole volumes kept for the report's viewer: which ones, their slices in order, their arrays, and volumes.npz."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from synomaly._evaluation_io import VOLUMES_NAME, read_volumes
from synomaly.data import load_cases
from synomaly.errors import InputError
from synomaly.evaluate import evaluate, write_evaluation
from synomaly.preprocess import Preprocessing
from synomaly.volume_keeper import VolumeKeeper
from synomaly.volumes import slice_numbers, volume_layout

SIZE = 8


def _masks(areas: list[int]) -> torch.Tensor:
    """``[N, 1, SIZE, SIZE]`` masks with ``areas[i]`` pixels set in slice ``i``."""
    masks = torch.zeros(len(areas), SIZE * SIZE, dtype=torch.bool)
    for i, area in enumerate(areas):
        masks[i, :area] = True
    return masks.view(-1, 1, SIZE, SIZE)


def _output(x0: torch.Tensor) -> SimpleNamespace:
    """A detection output whose arrays are recognisable functions of the input."""
    return SimpleNamespace(reconstruction=x0 * 0.5, anomaly_map=x0.abs() + 1.0, mask=x0 > 0.5)


def test_chooses_the_largest_lesions_then_one_healthy_volume_and_orders_slices():
    # Volumes: a (lesion 5 px), b (healthy, 2 slices), c (lesion 9), d (one slice: never shown), e (lesion 1),
    # f (healthy, 3 slices: the longest healthy one), g (lesion 7).
    groups = ["a", "a", "b", "b", "c", "c", "d", "e", "e", "f", "f", "f", "g", "g"]
    areas = [2, 3, 0, 0, 4, 5, 50, 1, 0, 0, 0, 0, 7, 0]
    numbers = [11, 10, 0, 1, 5, 3, 0, 1, 2, 7, 9, 8, 0, 1]
    keeper = VolumeKeeper(_masks(areas), groups, numbers, len(groups), keep=4)
    assert keeper.volume_ids == ["c", "g", "a", "f"]  # largest lesion first; the healthy one last
    x0 = torch.arange(len(groups), dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 1, SIZE, SIZE).contiguous()
    for start in range(0, len(groups), 4):  # batches of 4, the last one short
        batch = slice(start, start + 4)
        keeper.update(start, x0[batch], _masks(areas)[batch], _output(x0[batch]), None)
    arrays = keeper.arrays([f"case{i}" for i in range(len(groups))])
    assert arrays["volume_id"].tolist() == ["c", "g", "a", "f"]
    assert arrays["case_id"].tolist() == ["case5", "case4", "case12", "case13", "case1", "case0", "case9", "case11", "case10"]
    assert arrays["slice"].tolist() == [3, 5, 0, 1, 10, 11, 7, 8, 9]
    assert arrays["volume"].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 3]
    index = [5, 4, 12, 13, 1, 0, 9, 11, 10]
    assert np.array_equal(arrays["image"], x0[index, 0].numpy())
    assert np.array_equal(arrays["reconstruction"], 0.5 * x0[index, 0].numpy())
    assert np.array_equal(arrays["anomaly_map"], x0[index, 0].numpy() + 1.0)
    assert np.array_equal(arrays["mask"], x0[index, 0].numpy() > 0.5)
    assert np.array_equal(arrays["target"], _masks(areas)[index, 0].numpy())
    assert arrays["foreground"].all() and arrays["image"].dtype == np.float32 and arrays["mask"].dtype == bool


def test_without_a_healthy_volume_all_places_go_to_lesions_and_nothing_without_volume_ids():
    groups = ["a", "a", "b", "b", "c", "c"]
    keeper = VolumeKeeper(_masks([1, 0, 3, 0, 2, 0]), groups, None, 6, keep=2)
    assert keeper.volume_ids == ["b", "c"]
    assert VolumeKeeper(_masks([1] * 6), None, None, 6).arrays(["x"] * 6) == {}
    assert VolumeKeeper(None, ["a"] * 6, None, 6).volume_ids == ["a"]  # masks None: every volume is healthy
    single = VolumeKeeper(_masks([1, 0, 2]), ["x", "y", "z"], None, 3)  # single-slice volumes (images): none kept
    single.update(0, torch.zeros(3, 1, SIZE, SIZE), _masks([1, 0, 2]), _output(torch.zeros(3, 1, SIZE, SIZE)), None)
    assert single.volume_ids == [] and single.arrays(["a", "b", "c"]) == {}
    with pytest.raises(ValueError, match="slice numbers"):
        VolumeKeeper(None, groups, [0, 1], 6)


def test_a_long_volume_is_cut_to_a_window_around_its_lesion():
    count = 20
    areas = [0] * count
    areas[15] = areas[16] = 5
    keeper = VolumeKeeper(_masks(areas), ["v"] * count, list(range(count)), count, max_slices=6)
    x0 = torch.zeros(count, 1, SIZE, SIZE)
    keeper.update(0, x0, _masks(areas), _output(x0), None)
    assert keeper.arrays([str(i) for i in range(count)])["slice"].tolist() == [13, 14, 15, 16, 17, 18]


def test_slice_numbers_come_from_the_bundle_or_the_file(tmp_path):
    bundle = tmp_path / "data.npz"
    images = np.random.default_rng(0).uniform(0, 255, (5, 16, 16)).astype(np.float32)
    np.savez(bundle, scans=images, scans_ids=np.array(["p1"] * 5), scans_slice=np.array([9, 3, 4, 8, 7]),
             other=images)
    pre = Preprocessing(size=16, fit="letterbox")
    cases = load_cases([f"{bundle}:scans", f"{bundle}:other"], pre, slice_range=(1, 4))
    assert slice_numbers(cases.files) == [3, 4, 8, 1, 2, 3]  # `other` has no _slice: its indices in the stack
    # A slice range keeps each slice's name (its index in the array) and its volume from `scans_ids`.
    assert cases.files[0].case_ids == ["scans[1]", "scans[2]", "scans[3]"] and cases.files[0].group_ids == ["p1"] * 3
    assert volume_layout(cases).positions == [3, 4, 8, 1, 2, 3]
    np.savez(bundle, scans=images, scans_slice=np.array([1, 2]))
    with pytest.raises(InputError, match="scans_slice has 2 entries for 5 slices"):
        slice_numbers(load_cases([f"{bundle}:scans"], pre).files)
    np.savez(bundle, scans=images, scans_slice=np.zeros((5, 2), dtype=np.int64))
    with pytest.raises(InputError, match="1-D integer array"):
        slice_numbers(load_cases([f"{bundle}:scans"], pre).files)


def test_evaluate_keeps_whole_volumes_and_writes_them(random_pipeline, tmp_path):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(10, 1, 32, 32, generator=g) * 2 - 1
    masks = torch.zeros(10, 1, 32, 32, dtype=torch.bool)
    masks[[1, 2, 7], :, 10:14, 10:14] = True
    groups = ["p1"] * 4 + ["p2"] * 3 + ["p3"] * 3
    numbers = [3, 2, 1, 0, 0, 1, 2, 5, 4, 6]
    result = evaluate(random_pipeline, images, masks, case_ids=[f"c{i}" for i in range(10)], group_ids=groups,
                      slice_numbers=numbers, batch_size=3, progress=False, max_stages=1)
    volumes = result.volumes
    assert volumes["volume_id"].tolist() == ["p1", "p3", "p2"]  # 32 and 16 lesion pixels, then the healthy one
    order = [3, 2, 1, 0, 8, 7, 9, 4, 5, 6]
    assert volumes["case_id"].tolist() == [f"c{i}" for i in order]
    assert np.array_equal(volumes["image"], images[order, 0].numpy())
    assert np.array_equal(volumes["target"], masks[order, 0].numpy())
    detected = random_pipeline.detect(images[:3], torch.Generator().manual_seed(0), max_stages=1)
    first = [order.index(i) for i in range(3)]
    assert np.allclose(volumes["anomaly_map"][first], detected.anomaly_map[:, 0].numpy(), atol=1e-6)
    assert np.array_equal(volumes["mask"][first], detected.mask[:, 0].numpy())
    write_evaluation(result, tmp_path)
    assert read_volumes(tmp_path)["slice"].tolist() == [0, 1, 2, 3, 4, 5, 6, 0, 1, 2]
    again = evaluate(random_pipeline, images, masks, case_ids=[f"c{i}" for i in range(10)], batch_size=5, progress=False,
                     max_stages=1)
    write_evaluation(again, tmp_path, overwrite=True)
    assert not (tmp_path / VOLUMES_NAME).exists() and read_volumes(tmp_path) == {}  # the earlier run's volumes are gone
