"""The benchmark harness on real data with the ``smoke`` profile (a tiny UNet, 20 steps)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = ("method", "dataset", "profile", "commit", "device", "config", "chosen", "metrics", "nfe_mean", "nfe_max",
            "ms_per_image", "train_seconds")
METRICS = ("dice_mean", "dice_pooled", "iou_mean", "ap", "auroc_pixel", "auroc_image", "auroc_image_level_matched",
           "hd95_mean", "ssim_healthy")


def load(name):
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[f"benchmarks_{name}"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smoke_results(shared_data, tmp_path_factory):
    run = load("run")
    root = tmp_path_factory.mktemp("bench")
    methods = ["synomaly", "synomaly-1stage", "ddpm-simplex", "dae", "supervised-unet"]
    argv = ["--profile", "smoke", "--datasets", "lgg_flair", "--methods", *methods, "--data-root", str(shared_data),
            "--runs", str(root / "runs"), "--results", str(root / "results")]
    assert run.main(argv) == 0
    return run, argv, root / "results" / "smoke" / "lgg_flair", methods


def test_every_run_writes_the_required_fields(smoke_results):
    _, _, folder, methods = smoke_results
    for method in methods:
        record = json.loads((folder / f"{method}.json").read_text())
        assert all(key in record for key in REQUIRED) and all(key in record["metrics"] for key in METRICS)
        assert record["method"] == method and record["dataset"] == "lgg_flair" and record["profile"] == "smoke"
        assert 0 <= record["metrics"]["dice_mean"] <= 1 and record["train_seconds"] > 0
    synomaly, one_stage = (json.loads((folder / f"{m}.json").read_text()) for m in ("synomaly", "synomaly-1stage"))
    assert one_stage["chosen"]["max_stages"] == 1 and synomaly["chosen"]["max_stages"] > 1
    assert one_stage["trained_as"] == "synomaly" and one_stage["train_seconds"] == synomaly["train_seconds"]
    chain = json.loads((folder / "ddpm-simplex.json").read_text())
    assert chain["chosen"]["sampler"] == "chain" and chain["nfe_mean"] == 10


def test_finished_runs_are_skipped(smoke_results):
    run, argv, folder, methods = smoke_results
    before = {m: (folder / f"{m}.json").read_bytes() for m in methods}
    assert run.main(argv) == 0
    assert {m: (folder / f"{m}.json").read_bytes() for m in methods} == before


def test_unsupervised_threshold_is_evaluated_too(smoke_results):
    _, _, folder, _ = smoke_results
    record = json.loads((folder / "synomaly.json").read_text())
    assert record["unsupervised"]["threshold"] == record["calibration"]["healthy_percentile_threshold"]
    assert 0 <= record["unsupervised"]["dice_mean"] <= 1


def test_docs_benchmarks_is_rendered_from_the_committed_results():
    assert load("render").main(["--check"]) == 0, "run python benchmarks/render.py"


def test_breakdown_splits_the_mean_dice_by_lesion_size(smoke_results):
    _, argv, folder, methods = smoke_results
    runs = Path(argv[argv.index("--runs") + 1])
    table = load("breakdown").main(["--profile", "smoke", "--dataset", "lgg_flair", "--runs", str(runs)])
    assert set(table) == set(methods)
    for method, row in table.items():
        record = json.loads((folder / f"{method}.json").read_text())
        assert row["all"] == pytest.approx(record["metrics"]["dice_mean"])
        terciles = [value for key, value in row.items() if key.startswith(("small", "middle", "large"))]
        assert len(terciles) == 3 and min(terciles) <= row["all"] <= max(terciles)
