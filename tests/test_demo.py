"""The built-in demo with the shipped model: calibrate, evaluate and report on the MNI152 template."""

import json

import numpy as np
import pytest

from synomaly._evaluation_io import read_volumes
from synomaly.cli import main
from synomaly.demo import VOLUME_ID, demo_data, shipped_model

pytest.importorskip("nilearn", reason="the demo reads the MNI152 template shipped in the nilearn wheel")


def test_demo_splits_keep_lesions_out_of_training():
    data = demo_data(64, seed=0)
    assert len(data.train) == 2 * len(data.test_images)
    assert data.test_masks.any() and data.val_masks.any()
    anomalous = data.test_masks.flatten(1).any(1)
    assert 0 < anomalous.sum() < len(anomalous)  # both healthy and lesioned test slices
    assert not (data.test_masks & ~data.foreground["test"]).any()
    # The test slices are every fourth axial slice of the template: one volume, numbered as in the template.
    assert data.test_slices == sorted(data.test_slices) and set(np.diff(data.test_slices)) == {4}
    assert data.test_ids == [f"z{k:03d}" for k in data.test_slices]


@pytest.mark.skipif(not (shipped_model() / "model.safetensors").exists(), reason="demo model not shipped")
def test_demo_runs_end_to_end_and_detects_the_blobs(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["--quiet", "demo", "-o", str(out), "--device", "cpu"]) == 0
    html = (out / "report.html").read_text()
    assert "What this demo shows" in html and "What it does not show" in html
    metrics = json.loads((out / "evaluation" / "metrics.json").read_text())["aggregate"]
    prevalence = 0.005  # synthetic blob pixels among all test pixels (about 0.5 %)
    assert metrics["ap"] > 20 * prevalence
    assert metrics["dice_mean"] > 0.3
    thresholds = json.loads((out / "model" / "thresholds.json").read_text())
    calibration = thresholds["calibration"]
    assert calibration["selection"] == "fewer-stages" and calibration["best"]["dice"] >= calibration["score"]
    # The notes say when the fewest-stages rule took fewer stages than the best point.
    assert ("Calibration chose" in html) == (calibration["best"]["max_stages"] != thresholds["detect"]["max_stages"])
    # The viewer shows the test slices as one volume, in template order, with the lesions of its mask.
    volumes = read_volumes(out / "evaluation")
    assert volumes["volume_id"].tolist() == [VOLUME_ID] and volumes["slice"].tolist() == demo_data(64).test_slices
    assert f'aria-label="volume {VOLUME_ID}"' in html and html.count("<tr data-slice=") >= 6
    assert main(["demo", "-o", str(out)]) == 2  # an existing demo is not overwritten


@pytest.mark.parametrize("existing", ["model", "evaluation"])
def test_demo_keeps_an_earlier_model_or_evaluation_in_its_folder(tmp_path, capsys, existing):
    from synomaly.cli import main

    (tmp_path / existing).mkdir()
    (tmp_path / existing / "mine.txt").write_text("keep me")
    assert main(["--quiet", "demo", "-o", str(tmp_path), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert existing in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.rglob("*")) == sorted([existing, "mine.txt"])
