"""The built-in demo with the shipped model: calibrate, evaluate and report on the MNI152 template."""

import json

import pytest

from synomaly.cli import main
from synomaly.demo import demo_data, shipped_model

pytest.importorskip("nilearn", reason="the demo reads the MNI152 template shipped in the nilearn wheel")


def test_demo_splits_keep_lesions_out_of_training():
    data = demo_data(64, seed=0)
    assert len(data.train) == 2 * len(data.test_images)
    assert data.test_masks.any() and data.val_masks.any()
    anomalous = data.test_masks.flatten(1).any(1)
    assert 0 < anomalous.sum() < len(anomalous)  # both healthy and lesioned test slices
    assert not (data.test_masks & ~data.foreground["test"]).any()


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
    assert (out / "model" / "thresholds.json").exists()
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
