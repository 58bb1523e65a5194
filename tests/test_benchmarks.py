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
    methods = ["synomaly", "synomaly-1stage", "ddpm-simplex", "dae", "dae-no-fg", "supervised-unet"]
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


def test_a_baseline_without_foreground_reuses_its_model_and_drops_the_head_mask(smoke_results):
    run, argv, folder, _ = smoke_results
    with_fg, without = (json.loads((folder / f"{m}.json").read_text()) for m in ("dae", "dae-no-fg"))
    assert without["trained_as"] == "dae" and without["train_seconds"] == with_fg["train_seconds"]
    runs = Path(argv[argv.index("--runs") + 1]) / "smoke" / "lgg_flair"
    foreground = {m: json.loads((runs / m / "model" / "config.json").read_text())["preprocess"]["foreground"]
                  for m in ("dae", "dae-no-fg")}
    assert foreground == {"dae": "auto", "dae-no-fg": "none"}
    assert (runs / "dae-no-fg" / "model" / "model.safetensors").read_bytes() == (runs / "dae" / "model" / "model.safetensors").read_bytes()


def test_finished_runs_are_skipped(smoke_results):
    run, argv, folder, methods = smoke_results
    before = {m: (folder / f"{m}.json").read_bytes() for m in methods}
    assert run.main(argv) == 0
    assert {m: (folder / f"{m}.json").read_bytes() for m in methods} == before


def test_a_model_trained_with_another_recipe_is_not_reused(smoke_results, monkeypatch):
    run, argv, folder, _ = smoke_results
    (folder / "synomaly.json").rename(folder / "synomaly.json.kept")
    try:
        # The preset's flips change after the model was trained: the harness stops instead of measuring the old model.
        changed = dict(run.METHODS["synomaly"].train_options, flips="none")
        monkeypatch.setitem(run.METHODS, "synomaly", run.dataclasses.replace(run.METHODS["synomaly"], train_options=changed))
        with pytest.raises(SystemExit, match=r"synomaly/model: trained with another recipe \(training.flips 'horizontal' "
                                             r"there, 'none' now\); remove the folder"):
            run.main([*argv[:argv.index("--methods") + 1], "synomaly", *argv[argv.index("--data-root"):]])
    finally:
        (folder / "synomaly.json.kept").rename(folder / "synomaly.json")


def test_unsupervised_threshold_is_evaluated_too(smoke_results):
    _, _, folder, _ = smoke_results
    for method, same_pass in (("synomaly", False), ("synomaly-1stage", True)):  # one stage: scored in the test pass
        record = json.loads((folder / f"{method}.json").read_text())
        assert record["unsupervised"]["threshold"] == record["calibration"]["healthy_percentile_threshold"]
        assert 0 <= record["unsupervised"]["dice_mean"] <= 1
        assert record["unsupervised"].get("same_pass", False) is same_pass


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


def _result(folder, name, dice, **metrics):
    folder.mkdir(parents=True, exist_ok=True)
    record = {"method": name, "profile": "cpu", "dataset": "lgg_flair", "metrics": {"dice_mean": dice, **metrics}}
    (folder / f"{name}.json").write_text(json.dumps(record))


def _evaluation(folder, aggregate, volumes=None):
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({"aggregate": aggregate}))
    if volumes is not None:
        rows = ["group_id,n_slices,tp,fp,fn,tn,dice"] + [f"p{i},3,{tp},{fp},{fn},100,0.5" for i, (tp, fp, fn) in enumerate(volumes)]
        (folder / "per_volume.csv").write_text("\n".join(rows) + "\n")


def test_volumes_fills_old_results_from_their_evaluation_folders(tmp_path):
    volumes = load("volumes")
    results, runs = tmp_path / "results" / "cpu" / "lgg_flair", tmp_path / "runs" / "cpu" / "lgg_flair"
    _result(results, "synomaly", 0.5, dice_volume_mean=0.4)  # evaluated before lesions were counted
    _evaluation(runs / "synomaly" / "evaluation", {"dice_mean": 0.5, "dice_volume_mean": 0.4}, [(10, 5, 20), (0, 3, 0)])
    new = {"dice_mean": 0.3, "dice_volume_mean": 0.2, "n_volumes": 2, "lesion_sensitivity": 0.75, "lesion_sensitivity_n": 4,
           "fp_lesions_per_volume": 1.5, "lesion_volume_error_mean": -2.0, "lesion_volume_abs_error_mean": 3.0,
           "lesion_volume_unit": "voxels"}
    _result(results, "vae", 0.3)
    _evaluation(runs / "vae" / "evaluation", new)
    _result(results, "dae", 0.1)  # its folder holds another run's evaluation
    _evaluation(runs / "dae" / "evaluation", {"dice_mean": 0.2, "dice_volume_mean": 0.1}, [(1, 1, 1)])
    assert volumes.main(["--profile", "cpu", "--runs", str(tmp_path / "runs"), "--results", str(tmp_path / "results")]) == 0
    old = json.loads((results / "synomaly.json").read_text())
    assert old["metrics"]["lesion_volume_error_mean"] == ((15 - 30) + (3 - 0)) / 2  # predicted minus reference voxels
    assert old["metrics"]["lesion_volume_abs_error_mean"] == (15 + 3) / 2 and old["metrics"]["n_volumes"] == 2
    assert "lesion_sensitivity" not in old["metrics"] and old["per_volume_from"].startswith("per_volume.csv")
    filled = json.loads((results / "vae.json").read_text())
    assert {key: filled["metrics"][key] for key in new} == new and filled["per_volume_from"] == "evaluation"
    assert "per_volume_from" not in json.loads((results / "dae.json").read_text())
    render = load("render")
    table = render.volume_table({"synomaly": old, "vae": filled, "dae": json.loads((results / "dae.json").read_text())})
    assert table[2] == "| `synomaly` | 0.400 | – | – | 9 vox | -6 vox |"
    assert table[3] == "| `vae` | 0.200 | 0.750 (of 4) | 1.50 | 3 vox | -2 vox |"
    assert table[4] == "| `dae` | – | – | – | – | – |"


def test_runs_record_per_volume_numbers_and_volumes_rerun_restores_them(smoke_results, tmp_path):
    run, argv, folder, _ = smoke_results
    record = json.loads((folder / "synomaly-1stage.json").read_text())
    assert record["metrics"]["n_volumes"] == 19 and record["metrics"]["lesion_volume_unit"] == "voxels"
    assert record["metrics"]["lesion_sensitivity_n"] > 0 and 0 <= record["metrics"]["lesion_sensitivity"] <= 1
    # An older result and evaluation, made before lesions were counted: --rerun evaluates the stored model again.
    runs = Path(argv[argv.index("--runs") + 1])
    evaluation = runs / "smoke" / "lgg_flair" / "synomaly-1stage" / "evaluation" / "metrics.json"
    metrics = json.loads(evaluation.read_text())
    for key in run.VOLUME_KEYS:
        metrics["aggregate"].pop(key)
    evaluation.write_text(json.dumps(metrics))
    results = tmp_path / "results" / "smoke" / "lgg_flair"
    results.mkdir(parents=True)
    old = {**record, "metrics": {k: v for k, v in record["metrics"].items() if k not in run.VOLUME_KEYS}}
    (results / "synomaly-1stage.json").write_text(json.dumps(old))
    volumes = load("volumes")
    common = ["--profile", "smoke", "--methods", "synomaly-1stage", "--runs", str(runs), "--results", str(tmp_path / "results"),
              "--data-root", argv[argv.index("--data-root") + 1]]
    assert volumes.main(common) == 0
    assert "lesion_sensitivity" not in json.loads((results / "synomaly-1stage.json").read_text())["metrics"]
    assert volumes.main([*common, "--rerun"]) == 0
    filled = json.loads((results / "synomaly-1stage.json").read_text())
    assert {key: filled["metrics"][key] for key in run.VOLUME_KEYS} == {key: record["metrics"][key] for key in run.VOLUME_KEYS}
    assert filled["per_volume_from"].startswith("re-evaluated the stored model")
