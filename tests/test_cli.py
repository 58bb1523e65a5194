"""The ``synomaly`` command end to end on a tiny on-disk data set in every format."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from synomaly.cli import main
from synomaly.io import read_images
from synomaly.synthetic import healthy_phantoms, insert_lesions


def to_uint8(x: torch.Tensor) -> np.ndarray:
    return ((x.numpy() + 1) * 127.5).round().astype(np.uint8)


@pytest.fixture(scope="session")
def disk_data(tmp_path_factory):
    """Healthy and lesioned phantoms as PNG folders (non-square), a NIfTI volume, a DICOM series and an npz."""
    import nibabel as nib
    from PIL import Image
    from test_io import write_dicom

    root = tmp_path_factory.mktemp("disk_data")
    g = torch.Generator().manual_seed(5)
    healthy, head = healthy_phantoms(24, 32, g)
    lesioned, masks = insert_lesions(healthy[:12], head[:12], g)
    for name in ("png_healthy", "png_lesioned", "png_masks"):
        (root / name).mkdir()
    for i in range(6):  # non-square 32x40 PNGs: letterboxed to the model's 32x32 and back
        pad = lambda a: np.pad(a, ((0, 0), (4, 4)))  # noqa: E731
        Image.fromarray(pad(to_uint8(healthy[i, 0]))).save(root / "png_healthy" / f"h{i}.png")
        Image.fromarray(pad(to_uint8(lesioned[i, 0]))).save(root / "png_lesioned" / f"l{i}.png")
        Image.fromarray(pad(masks[i, 0].numpy().astype(np.uint8) * 255)).save(root / "png_masks" / f"l{i}.png")
    volume = np.stack([np.rot90(to_uint8(x[0]), -1) for x in lesioned[:6]], axis=2).astype(np.int16)
    affine = np.diag([0.9, 0.9, 3.0, 1.0])
    nib.save(nib.Nifti1Image(volume, affine), root / "vol.nii.gz")
    mask_vol = np.stack([np.rot90(m[0].numpy().astype(np.uint8), -1) for m in masks[:6]], axis=2)
    nib.save(nib.Nifti1Image(mask_vol, affine), root / "vol_mask.nii.gz")
    (root / "series").mkdir()
    for k in range(3):
        write_dicom(root / "series" / f"s{k}.dcm", to_uint8(lesioned[k, 0]).astype(np.uint16), position=(0, 0, 2.0 * k), instance=k + 1)
    np.savez(root / "bundle.npz", healthy=to_uint8(healthy[12:, 0]), anomalous=to_uint8(lesioned[:, 0]), masks=masks[:, 0].numpy().astype(np.uint8))
    return root


def run(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_help_lists_every_subcommand():
    out = subprocess.run([sys.executable, "-m", "synomaly.cli", "--help"], capture_output=True, text=True, check=True).stdout
    for name in ("train", "detect", "calibrate", "evaluate", "report", "demo"):
        assert name in out


def test_train_from_png_folder_writes_a_model_folder(disk_data, tmp_path, capsys):
    out = tmp_path / "model"
    code, _, err = run(["--quiet", "train", str(disk_data / "png_healthy"), str(disk_data / "bundle.npz:healthy"),
                        "-o", str(out), "--network", "tiny", "--image-size", "32", "--train.steps", "3",
                        "--batch-size", "4", "--train.progress", "false", "--device", "cpu"], capsys)
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())
    assert config["preprocess"]["size"] == 32 and config["training"]["images"] == 18
    assert config["noise"]["name"] == "synomaly" and config["noise"]["sigma"] == pytest.approx(0.75)
    assert config["detect"]["min_size"] == 2  # 30 px at 128, scaled by area
    code, _, err = run(["train", str(disk_data / "png_healthy"), "-o", str(out), "--network", "tiny", "--image-size", "32"], capsys)
    assert code == 2 and "--resume" in err and "Traceback" not in err


def test_detect_writes_outputs_on_each_input_grid(tiny_model_dir, disk_data, tmp_path, capsys):
    out = tmp_path / "detect"
    inputs = [disk_data / "png_lesioned", disk_data / "vol.nii.gz", disk_data / "series", f"{disk_data / 'bundle.npz'}:anomalous"]
    code, _, err = run(["--quiet", "detect", *map(str, inputs), "-m", str(tiny_model_dir), "-o", str(out), "--device", "cpu"], capsys)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["cases"]) == 6 + 1 + 1 + 1 and not summary["failed"]
    png_case = out / "png_lesioned__l0" if (out / "png_lesioned__l0").exists() else out / "l0"
    png_map = np.load(png_case / "anomaly_map.npy")
    assert png_map.shape == (1, 32, 40)
    _, props = read_images(disk_data / "vol.nii.gz")
    mask_vol, mask_props = read_images(out / "vol" / "mask.nii.gz")
    assert mask_vol.shape == (6, 32, 32) and np.allclose(mask_props.affine, props.affine)
    assert (out / "series" / "mask.nii.gz").exists()
    assert np.load(out / "bundle__anomalous" / "mask.npy").shape == (12, 32, 32)
    # A second run finds every case done and rewrites nothing.
    before = (out / "vol" / "case.json").stat().st_mtime_ns
    assert run(["--quiet", "detect", *map(str, inputs), "-m", str(tiny_model_dir), "-o", str(out), "--device", "cpu"], capsys)[0] == 0
    assert (out / "vol" / "case.json").stat().st_mtime_ns == before


def test_detect_reports_and_skips_a_corrupt_file(tiny_model_dir, disk_data, tmp_path, capsys):
    bad = tmp_path / "inputs"
    bad.mkdir()
    (bad / "broken.png").write_bytes(b"\x89PNG not really")
    (bad / "good.png").write_bytes((disk_data / "png_lesioned" / "l0.png").read_bytes())
    code, _, err = run(["--quiet", "detect", str(bad), "-m", str(tiny_model_dir), "-o", str(tmp_path / "out"), "--device", "cpu"], capsys)
    assert code == 1 and "broken.png" in err and "Traceback" not in err
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [f["input"].endswith("broken.png") for f in summary["failed"]] == [True] and len(summary["cases"]) == 1
    assert not (tmp_path / "out" / "broken").exists()
    code, _, err = run(["detect", str(bad), "-m", str(tiny_model_dir), "-o", str(tmp_path / "stop"), "--on-error", "stop"], capsys)
    assert code == 2 and err.count("\n") == 1 and "broken.png" in err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--t", "1000"], "detect.t: must be < T=1000"),
        (["--kernel", "4"], "detect.kernel"),
        (["-m", "/nonexistent/model"], "/nonexistent/model: model folder not found"),
    ],
)
def test_detect_option_errors_are_one_line(tiny_model_dir, disk_data, tmp_path, capsys, args, message):
    base = ["detect", str(disk_data / "vol.nii.gz"), "-m", str(tiny_model_dir), "-o", str(tmp_path / "o")]
    code, _, err = run(base + args, capsys)
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path):
    import shutil

    dest = tmp_path / "model"
    shutil.copytree(tiny_model_dir, dest, ignore=shutil.ignore_patterns("checkpoints", "logs", "previews"))
    return dest


def test_calibrate_with_masks_then_evaluate_and_report(model_copy, disk_data, tmp_path, capsys):
    bundle = disk_data / "bundle.npz"
    code, _, err = run(["--quiet", "calibrate", f"{bundle}:healthy", f"{bundle}:anomalous", "--masks", "none", f"{bundle}:masks",
                        "-m", str(model_copy), "--grid.t", "[100, 200]", "--grid.kernel", "[3]",
                        "--grid.threshold", "[0.1, 0.2]", "--grid.max-stages", "[1, 3]", "--device", "cpu"], capsys)
    assert code == 0, err
    thresholds = json.loads((model_copy / "thresholds.json").read_text())
    assert thresholds["calibration"]["method"] == "dice-grid" and thresholds["detect"]["t"] in (100, 200)
    ev = tmp_path / "eval"
    code, _, err = run(["--quiet", "evaluate", str(disk_data / "png_lesioned"), f"{bundle}:healthy", "--masks",
                        str(disk_data / "png_masks"), "none", "-m", str(model_copy), "-o", str(ev), "--device", "cpu"], capsys)
    assert code == 0, err
    metrics = json.loads((ev / "metrics.json").read_text())
    assert metrics["aggregate"]["n_anomalous"] == 6 and metrics["aggregate"]["n_healthy"] == 12
    assert metrics["detect"]["t"] == thresholds["detect"]["t"]
    assert (ev / "per_case.csv").read_text().count("\n") == 19
    code, _, err = run(["--quiet", "report", str(ev)], capsys)
    assert code == 0, err
    html = (ev / "report.html").read_text()
    assert "Dice" in html and "l0.png" in html
    assert run(["report", str(ev)], capsys)[0] == 2  # no silent overwrite


def test_calibrate_without_masks_uses_healthy_percentile(model_copy, disk_data, capsys, caplog):
    code, _, err = run(["calibrate", f"{disk_data / 'bundle.npz'}:healthy", "-m", str(model_copy), "--device", "cpu"], capsys)
    assert code == 0, err
    thresholds = json.loads((model_copy / "thresholds.json").read_text())
    assert thresholds["calibration"]["method"] == "healthy-percentile"
    assert thresholds["calibration"]["warnings"]


def test_print_config_round_trips_through_a_yaml_file(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["detect", "x.png", "-m", "m", "-o", "o", "--threshold", "0.3", "--print-config"])
    yaml = capsys.readouterr().out
    assert "threshold: 0.3" in yaml
    (tmp_path / "c.yaml").write_text(yaml)
    from synomaly.cli import build_parser

    args = build_parser().parse_args(["detect", "--config", str(tmp_path / "c.yaml")])
    assert args.detect.threshold == 0.3 and args.detect.inputs == ["x.png"]


@pytest.mark.parametrize("option, deprecated", [("--blob-threshold", False), ("--threshold", True)])
def test_train_blob_threshold_and_its_deprecated_spelling(disk_data, tmp_path, capsys, caplog, option, deprecated):
    out = tmp_path / "model"
    code, _, err = run(["--quiet", "train", str(disk_data / "png_healthy"), "-o", str(out), "--network", "tiny",
                        "--image-size", "32", "--train.steps", "1", "--batch-size", "4", "--train.progress", "false",
                        "--device", "cpu", option, "120"], capsys)
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["noise"]["threshold"] == 120.0
    assert ("--threshold is deprecated" in caplog.text) == deprecated


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a CPU-only torch build")
@pytest.mark.parametrize("command", ["detect", "train", "calibrate", "evaluate"])
@pytest.mark.parametrize("device", ["cuda", "cuda:1", "gpu"])
def test_a_missing_gpu_is_one_line_before_any_work(tiny_model_dir, disk_data, tmp_path, capsys, command, device):
    png = str(disk_data / "png_healthy" / "h0.png")
    argv = {"detect": ["detect", png, "-m", str(tiny_model_dir), "-o", str(tmp_path / "out")],
            "train": ["train", png, "-o", str(tmp_path / "model")],
            "calibrate": ["calibrate", png, "-m", str(tmp_path / "missing-model")],
            "evaluate": ["evaluate", png, "--masks", "none", "-m", str(tiny_model_dir), "-o", str(tmp_path / "out")]}[command]
    code, _, err = run(["--quiet", *argv, "--device", device], capsys)
    assert code == 2 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and "--device" in err and "no CUDA GPU" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "model").exists()


def test_detect_rerun_with_other_settings_stops_instead_of_skipping(tiny_model_dir, disk_data, tmp_path, capsys):
    out = tmp_path / "out"
    base = ["--quiet", "detect", str(disk_data / "png_lesioned"), "-m", str(tiny_model_dir), "-o", str(out), "--device", "cpu"]
    code, _, err = run([*base, "--threshold", "0.15"], capsys)
    assert code == 0, err
    first = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    code, _, err = run([*base, "--threshold", "0.3"], capsys)  # would have skipped every case and lied
    assert code == 2 and "detect.threshold" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == first  # nothing touched
    code, _, err = run([*base, "--threshold", "0.15"], capsys)  # same settings: every case is skipped
    assert code == 0 and {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file() and p.name != "summary.json"} == {
        p: b for p, b in first.items() if p.name != "summary.json"}
    code, _, err = run([*base, "--threshold", "0.3", "--overwrite"], capsys)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["detect"]["threshold"] == 0.3
    assert all(case["made_with"]["detect"]["threshold"] == 0.3 for case in summary["cases"])


def test_each_input_gets_the_same_result_whether_or_not_others_are_skipped(tiny_model_dir, disk_data, tmp_path, capsys):
    base = ["--quiet", "detect", "-m", str(tiny_model_dir), "--device", "cpu", "--threshold", "0.1"]
    pngs = sorted((disk_data / "png_lesioned").glob("*.png"))
    assert run([*base, str(pngs[0]), str(pngs[1]), "-o", str(tmp_path / "both")], capsys)[0] == 0
    assert run([*base, str(pngs[1]), "-o", str(tmp_path / "one")], capsys)[0] == 0
    name = pngs[1].stem
    assert np.array_equal(np.load(tmp_path / "both" / name / "anomaly_map.npy"), np.load(tmp_path / "one" / name / "anomaly_map.npy"))


@pytest.mark.parametrize("scalar", ["inputs", "masks"])
def test_a_yaml_scalar_where_a_list_is_expected_is_one_item(tiny_model_dir, disk_data, tmp_path, capsys, scalar):
    png, mask = disk_data / "png_lesioned" / "l0.png", disk_data / "png_masks" / "l0.png"
    out = tmp_path / "out"
    if scalar == "inputs":
        (tmp_path / "c.yaml").write_text(f"model: {tiny_model_dir}\noutput: {out}\ninputs: {png}\ndevice: cpu\n")
        code, _, err = run(["--quiet", "detect", "--config", str(tmp_path / "c.yaml")], capsys)
        assert code == 0, err
        assert [case["input"] for case in json.loads((out / "summary.json").read_text())["cases"]] == [str(png)]
    else:
        (tmp_path / "c.yaml").write_text(f"model: {tiny_model_dir}\noutput: {out}\ndata: [{png}]\nmasks: {mask}\ndevice: cpu\n")
        code, _, err = run(["--quiet", "evaluate", "--config", str(tmp_path / "c.yaml")], capsys)
        assert code == 0, err
        assert json.loads((out / "metrics.json").read_text())["aggregate"]["n_anomalous"] == 1


def test_inputs_whose_names_clean_to_the_same_stem_get_their_own_outputs(tiny_model_dir, disk_data, tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "in"
    folder.mkdir()
    png = Image.open(disk_data / "png_lesioned" / "l0.png")
    for name in ("a b.png", "a_b.png", "a.png", "a.tif", "a+b.png"):
        png.save(folder / name)
    out = tmp_path / "out"
    base = ["--quiet", "detect", str(folder), "-m", str(tiny_model_dir), "-o", str(out), "--device", "cpu"]
    code, _, err = run(base, capsys)
    assert code == 0, err
    cases = json.loads((out / "summary.json").read_text())["cases"]
    assert len(cases) == 5 and len({c["output"] for c in cases}) == 5
    assert sorted(c["input"] for c in cases) == sorted(str(p) for p in folder.iterdir())
    assert all((out / c["output"] / "case.json").is_file() for c in cases)
    code, _, err = run(base, capsys)  # a rerun finds every case under the same name
    assert code == 0 and [c["output"] for c in json.loads((out / "summary.json").read_text())["cases"]] == [c["output"] for c in cases]


def test_a_second_detect_into_a_folder_in_use_is_refused(tiny_model_dir, disk_data, tmp_path, capsys):
    from synomaly import _atomic

    out = tmp_path / "out"
    with _atomic.folder_lock(out, "synomaly detect"):  # as a running detect holds it
        code, _, err = run(["--quiet", "detect", str(disk_data / "png_lesioned"), "-m", str(tiny_model_dir), "-o", str(out),
                            "--device", "cpu"], capsys)
    assert code == 2 and "another synomaly detect is writing into this folder" in err and len(err.strip().splitlines()) == 1
    assert list(out.iterdir()) == []
    code, _, err = run(["--quiet", "detect", str(disk_data / "png_lesioned" / "l0.png"), "-m", str(tiny_model_dir), "-o", str(out),
                        "--device", "cpu"], capsys)
    assert code == 0, err  # released: the lock leaves no file behind
    assert sorted(p.name for p in out.iterdir()) == ["l0", "summary.json"]


@pytest.mark.parametrize("spelling, expected", [("200", [200]), ("100,200", [100, 200]), ("[100, 300]", [100, 300])])
def test_calibrate_grid_takes_one_value_a_comma_list_or_a_list(model_copy, disk_data, capsys, spelling, expected):
    bundle = disk_data / "bundle.npz"
    code, _, err = run(["--quiet", "calibrate", f"{bundle}:anomalous", "--masks", f"{bundle}:masks", "-m", str(model_copy),
                        "--grid.t", spelling, "--grid.kernel", "3", "--grid.threshold", "0.1,0.2", "--grid.max-stages", "1",
                        "--device", "cpu"], capsys)
    assert code == 0, err
    calibration = json.loads((model_copy / "thresholds.json").read_text())["calibration"]
    assert calibration["grid"]["t"] == expected and calibration["grid"]["threshold"] == [0.1, 0.2]


@pytest.mark.parametrize("spelling", ["abc", "1.5", "100,x"])
def test_calibrate_grid_values_of_the_wrong_kind_name_the_option(model_copy, disk_data, capsys, spelling):
    code, _, err = run(["--quiet", "calibrate", str(disk_data / "png_lesioned"), "-m", str(model_copy), "--grid.t", spelling,
                        "--device", "cpu"], capsys)
    assert code == 2 and "grid.t" in err and len(err.strip().splitlines()) == 1


def test_detect_never_writes_through_a_symbolic_link_in_its_output_folder(tiny_model_dir, disk_data, tmp_path, capsys):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / "l0").symlink_to(elsewhere, target_is_directory=True)  # planted where the case folder of l0.png goes
    code, _, err = run(["--quiet", "detect", str(disk_data / "png_lesioned" / "l0.png"), "-m", str(tiny_model_dir), "-o", str(out),
                        "--device", "cpu", "--on-error", "stop"], capsys)
    assert code == 2 and "symbolic link" in err and "Traceback" not in err
    assert list(elsewhere.iterdir()) == []


def test_quiet_silences_the_progress_bars_of_every_command(model_copy, disk_data, tmp_path, capfd):
    bundle = disk_data / "bundle.npz"
    assert main(["--quiet", "calibrate", f"{bundle}:anomalous", "--masks", f"{bundle}:masks", "-m", str(model_copy),
                 "--grid.t", "200", "--grid.kernel", "3", "--grid.threshold", "0.2", "--grid.max-stages", "1,2",
                 "--device", "cpu"]) == 0
    assert main(["--quiet", "evaluate", f"{bundle}:anomalous", "--masks", f"{bundle}:masks", "-m", str(model_copy),
                 "-o", str(tmp_path / "ev"), "--device", "cpu"]) == 0
    assert main(["--quiet", "train", f"{bundle}:healthy", "-o", str(tmp_path / "m"), "--network", "tiny", "--image-size", "32",
                 "--train.steps", "2", "--batch-size", "4", "--device", "cpu"]) == 0
    err = capfd.readouterr().err
    assert "calibrate:" not in err and "evaluate:" not in err and "Epoch" not in err and "it/s" not in err, err


def test_score_a_detect_folder_by_file_name_and_in_order(tiny_model_dir, disk_data, tmp_path, capsys):
    from PIL import Image

    det = tmp_path / "det"
    base = ["--quiet", "detect", "-m", str(tiny_model_dir), "--device", "cpu", "--threshold", "0.1"]
    assert run([*base, str(disk_data / "png_lesioned"), "-o", str(det)], capsys)[0] == 0
    code, _, err = run(["--quiet", "score", str(det), "--references", str(disk_data / "png_masks"), "-o", str(tmp_path / "s")], capsys)
    assert code == 0, err
    metrics = json.loads((tmp_path / "s" / "metrics.json").read_text())
    assert metrics["aggregate"]["n_cases"] == 6 and metrics["settings"]["hd95_unit"] == "px"
    for row in metrics["per_case"]:  # an independent Dice from the files on disk
        name = row["group_id"]
        pred = np.load(det / name / "mask.npy")[0] > 0
        ref = np.asarray(Image.open(disk_data / "png_masks" / f"{name}.png")) > 0
        expected = 2 * (pred & ref).sum() / (pred.sum() + ref.sum()) if pred.sum() + ref.sum() else 1.0
        assert row["dice"] == pytest.approx(expected)
    assert (tmp_path / "s" / "per_case.csv").read_text().count("\n") == 7
    # A volume: references in order, HD95 in mm from the NIfTI's spacing.
    assert run([*base, str(disk_data / "vol.nii.gz"), "-o", str(tmp_path / "det2")], capsys)[0] == 0
    code, _, err = run(["--quiet", "score", str(tmp_path / "det2"), "-r", str(disk_data / "vol_mask.nii.gz"),
                        "-o", str(tmp_path / "s2")], capsys)
    assert code == 0, err
    metrics = json.loads((tmp_path / "s2" / "metrics.json").read_text())
    assert metrics["settings"]["hd95_unit"] == "mm" and len(metrics["per_volume"]) == 1
    assert run(["--quiet", "score", str(tmp_path / "det2"), "-r", str(disk_data / "vol_mask.nii.gz"), "-o", str(tmp_path / "s2")],
               capsys)[0] == 2  # no silent overwrite
    code, _, err = run(["--quiet", "score", str(tmp_path / "det2"), "-r", "none", "none", "-o", str(tmp_path / "s3")], capsys)
    assert code == 2 and "1 cases but 2 reference sources" in err


def test_masks_beside_their_images_kaggle_style(tiny_model_dir, disk_data, tmp_path, capsys):
    import shutil

    folder = tmp_path / "kaggle"
    folder.mkdir()
    for i in range(3):
        shutil.copy(disk_data / "png_lesioned" / f"l{i}.png", folder / f"case {i}.png")
        shutil.copy(disk_data / "png_masks" / f"l{i}.png", folder / f"case {i}_mask.png")
    code, _, err = run(["--quiet", "evaluate", str(folder), "--mask-suffix", "_mask", "-m", str(tiny_model_dir),
                        "-o", str(tmp_path / "ev"), "--device", "cpu"], capsys)
    assert code == 0, err
    per_case = json.loads((tmp_path / "ev" / "metrics.json").read_text())["per_case"]
    assert sorted(row["case_id"] for row in per_case) == ["case 0.png", "case 1.png", "case 2.png"]
    assert all(row["anomalous"] for row in per_case)
    code, _, err = run(["--quiet", "detect", str(folder), "--mask-suffix", "_mask", "-m", str(tiny_model_dir),
                        "-o", str(tmp_path / "det"), "--device", "cpu"], capsys)
    assert code == 0, err  # the masks are not taken for images
    summary = json.loads((tmp_path / "det" / "summary.json").read_text())
    assert sorted(Path(case["input"]).name for case in summary["cases"]) == ["case 0.png", "case 1.png", "case 2.png"]
    (folder / "case 2_mask.png").unlink()
    code, _, err = run(["--quiet", "evaluate", str(folder), "--mask-suffix", "_mask", "-m", str(tiny_model_dir),
                        "-o", str(tmp_path / "ev2"), "--device", "cpu"], capsys)
    assert code == 2 and f"{folder / 'case 2_mask.png'}: does not exist: the mask of case 2.png" in err  # names the mask
    code, _, err = run(["--quiet", "evaluate", str(folder), "-m", str(tiny_model_dir), "-o", str(tmp_path / "ev3")], capsys)
    assert code == 2 and "--masks" in err
    code, _, err = run(["--quiet", "evaluate", str(folder), "--masks", str(folder), "-m", str(tiny_model_dir),
                        "-o", str(tmp_path / "ev4"), "--device", "cpu"], capsys)
    assert code == 2 and f"{folder / 'case 0.png'}: is the image itself, not its mask" in err


def test_a_masks_subfolder_is_not_taken_for_images_unless_recursive(tiny_model_dir, disk_data, tmp_path, capsys):
    import shutil

    folder = tmp_path / "data"
    (folder / "masks").mkdir(parents=True)
    for i in range(2):
        shutil.copy(disk_data / "png_lesioned" / f"l{i}.png", folder / f"l{i}.png")
        shutil.copy(disk_data / "png_masks" / f"l{i}.png", folder / "masks" / f"l{i}.png")
    base = ["--quiet", "detect", str(folder), "-m", str(tiny_model_dir), "--device", "cpu"]
    for extra, expected in (([], ["l0", "l1"]), (["--recursive"], ["l0", "l1", "masks__l0", "masks__l1"])):
        code, _, err = run([*base, "-o", str(tmp_path / f"out{len(extra)}"), *extra], capsys)
        assert code == 0, err
        summary = json.loads((tmp_path / f"out{len(extra)}" / "summary.json").read_text())
        assert sorted(case["output"] for case in summary["cases"]) == expected
    code, _, err = run(["--quiet", "evaluate", str(folder), "--masks", str(folder / "masks"), "-m", str(tiny_model_dir),
                        "-o", str(tmp_path / "ev"), "--device", "cpu"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["aggregate"]["n_cases"] == 2


def test_detect_reports_lesion_areas_at_the_inputs_resolution(tiny_model_dir, disk_data, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(["--quiet", "detect", str(disk_data / "vol.nii.gz"), str(disk_data / "png_lesioned" / "l0.png"),
                "-m", str(tiny_model_dir), "-o", str(out), "--device", "cpu", "--threshold", "0.05"], capsys)[0] == 0
    cases = {c["output"]: c for c in json.loads((out / "summary.json").read_text())["cases"]}
    from synomaly.io import read_images

    mask, _ = read_images(out / "vol" / "mask.nii.gz")
    assert cases["vol"]["area_px"] == mask.reshape(len(mask), -1).sum(1).tolist()
    assert cases["vol"]["area_mm2"] == pytest.approx([a * 0.81 for a in cases["vol"]["area_px"]])  # 0.9 x 0.9 mm
    assert cases["l0"]["area_px"] == [int((np.load(out / "l0" / "mask.npy") > 0).sum())] and cases["l0"]["area_mm2"] is None
    # The score is the flagged area at the input's resolution: mm^2 where the spacing is known, else the input's pixels.
    assert cases["vol"]["score"] == pytest.approx(cases["vol"]["area_mm2"]) and cases["vol"]["score_unit"].startswith("mm^2")
    assert cases["l0"]["score"] == cases["l0"]["area_px"] and cases["l0"]["score_unit"].startswith("pixels of the 40x32 input")
    assert cases["vol"]["pictures"] is None and cases["vol"]["files"]["mask"] == "mask.nii.gz"  # volumes: NIfTI on their grid


@pytest.mark.parametrize("place", ["before", "after"])
def test_quiet_works_before_or_after_the_command(disk_data, tmp_path, place):
    argv = ["train", str(disk_data / "png_healthy"), "-o", str(tmp_path / "m"), "--method", "intensity", "--network",
            "tiny", "--image-size", "32", "--device", "cpu", "--overwrite"]
    command = [sys.executable, "-m", "synomaly.cli"]
    loud = subprocess.run(command + argv, capture_output=True, text=True)
    quiet_argv = ["--quiet", *argv] if place == "before" else [*argv, "--quiet"]
    quiet = subprocess.run(command + quiet_argv, capture_output=True, text=True)
    assert loud.returncode == 0 and quiet.returncode == 0, quiet.stderr
    assert "INFO" in loud.stderr and "INFO" not in quiet.stderr


def test_detect_sharded_over_two_torchrun_processes_matches_one_process(tiny_model_dir, disk_data, tmp_path, capsys):
    inputs = [str(disk_data / "png_lesioned"), str(disk_data / "vol.nii.gz"), f"{disk_data / 'bundle.npz'}:anomalous"]
    common = ["-m", str(tiny_model_dir), "--device", "cpu", "--batch-size", "4"]
    code, _, err = run(["--quiet", "detect", *inputs, "-o", str(tmp_path / "one"), *common], capsys)
    assert code == 0, err
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "synomaly.cli"]
    two = subprocess.run([*launcher, "--quiet", "detect", *inputs, "-o", str(tmp_path / "two"), *common],
                         capture_output=True, text=True, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert two.returncode == 0, two.stderr[-2000:]
    one_summary = json.loads((tmp_path / "one" / "summary.json").read_text())
    two_summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert two_summary["processes"] == 2
    assert [c["output"] for c in two_summary["cases"]] == [c["output"] for c in one_summary["cases"]]  # one summary, input order
    for case in one_summary["cases"]:  # each input draws its own noise: the shard it lands in changes nothing
        for name in case["files"].values():  # (to float rounding: the processes run one thread each)
            if name.endswith(".npy"):
                one, two = (np.load(tmp_path / run / case["output"] / name) for run in ("one", "two"))
                assert np.array_equal(one, two) if one.dtype == bool or "mask" in name else np.allclose(one, two, rtol=1e-4, atol=1e-5)
    assert sorted(p.name for p in (tmp_path / "two").iterdir() if p.name.startswith(".")) == []  # no lock folders left


# --- option names: dashes everywhere, earlier spellings kept for one release ---------------------


DEPRECATED_OPTIONS = {"train": {"--model", "--threshold"}}  # kept for one release; their help says what replaced them


def test_every_option_is_spelt_with_dashes_and_model_always_names_a_model_folder():
    from synomaly.cli import build_parser

    parsers = build_parser().subcommand_parsers
    for command, parser in parsers.items():
        names = [name for action in parser._actions for name in action.option_strings
                 if name.startswith("--") and name not in DEPRECATED_OPTIONS.get(command, ())]
        assert not [name for name in names if "_" in name], command
        for action in parser._actions:
            if "--model" in action.option_strings and command not in DEPRECATED_OPTIONS:
                assert "model folder" in action.help, command
    assert any("--network" in action.option_strings for action in parsers["train"]._actions)


@pytest.mark.parametrize("old, new", [("--max_stages", "--max-stages"), ("--min_size", "--min-size"),
                                      ("--chain_steps", "--chain-steps")])
def test_detect_options_spelt_with_underscores_still_work_with_one_warning(tiny_model_dir, disk_data, tmp_path, capsys, caplog,
                                                                          old, new):
    png = str(disk_data / "png_lesioned" / "l0.png")
    base = ["--quiet", "detect", png, "-m", str(tiny_model_dir), "--device", "cpu"]
    assert run([*base, "-o", str(tmp_path / "old"), f"{old}=2"], capsys)[0] == 0
    warnings = [r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()]
    assert warnings == [f"{old} is deprecated and will be removed in the next release: use {new}"]
    caplog.clear()
    assert run([*base, "-o", str(tmp_path / "new"), new, "2"], capsys)[0] == 0
    assert "deprecated" not in caplog.text
    made = [json.loads((tmp_path / d / "summary.json").read_text())["made_with"] for d in ("old", "new")]
    assert made[0] == made[1] and made[0]["detect"][old[2:]] == 2


def test_train_network_preset_and_its_earlier_spellings(disk_data, tmp_path, capsys, caplog):
    base = ["--quiet", "train", str(disk_data / "png_healthy"), "--method", "intensity", "--image-size", "32", "--device", "cpu"]
    assert run([*base, "-o", str(tmp_path / "new"), "--network", "tiny", "--train.num-workers", "0"], capsys)[0] == 0
    assert "deprecated" not in caplog.text
    assert run([*base, "-o", str(tmp_path / "old"), "--model", "tiny", "--train.num_workers", "0"], capsys)[0] == 0
    assert "train --model is deprecated" in caplog.text and "--train.num_workers is deprecated" in caplog.text
    configs = [json.loads((tmp_path / d / "config.json").read_text())["model"] for d in ("new", "old")]
    assert configs[0] == configs[1] and configs[0]["channels"] != list(__import__("synomaly").config.model_preset("small").channels)


def test_print_config_is_spelt_with_a_dash_and_config_files_keep_the_settings_names(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["calibrate", "x.png", "-m", "m", "--grid.max-stages", "1,2", "--min-size", "3", "--print-config"])
    yaml = capsys.readouterr().out
    assert "max_stages: 1,2" in yaml and "min_size: 3" in yaml
    (tmp_path / "c.yaml").write_text(yaml)
    from synomaly.cli import build_parser

    args = build_parser().parse_args(["calibrate", "--config", str(tmp_path / "c.yaml")])
    assert args.calibrate.grid.max_stages == "1,2" and args.calibrate.min_size == 3


# --- training geometry: recorded in config.json, inputs unlike it warned about ---------------------


def test_the_model_records_its_training_geometry_and_detect_warns_about_inputs_unlike_it(disk_data, tmp_path, capsys, caplog):
    import nibabel as nib

    volume = (np.random.default_rng(0).random((32, 32, 32)) * 200).astype(np.int16)
    nib.save(nib.Nifti1Image(volume, np.diag([0.9, 0.9, 0.9, 1.0])), tmp_path / "ras.nii.gz")
    flipped = np.diag([-0.9, -0.9, 0.9, 1.0])  # the same scan stored as LPS, a DICOM converter's habit
    flipped[:2, 3] = 31 * 0.9
    nib.save(nib.Nifti1Image(volume[::-1, ::-1].copy(), flipped), tmp_path / "lps.nii.gz")
    nib.save(nib.Nifti1Image(volume, np.diag([0.4, 0.4, 0.9, 1.0])), tmp_path / "fine.nii.gz")
    train = ["--quiet", "train", "--method", "intensity", "--network", "tiny", "--image-size", "32", "--device", "cpu"]
    assert run([*train, str(tmp_path / "ras.nii.gz"), "-o", str(tmp_path / "m")], capsys)[0] == 0
    training = json.loads((tmp_path / "m" / "config.json").read_text())["training"]
    assert training["orientation"] == "LPS" and training["pixel_spacing_mm"] == pytest.approx([0.9, 0.9])
    assert run([*train, str(disk_data / "png_healthy"), "-o", str(tmp_path / "png")], capsys)[0] == 0
    training = json.loads((tmp_path / "png" / "config.json").read_text())["training"]
    assert training["orientation"] is None and training["pixel_spacing_mm"] is None  # images record neither
    detect = ["--quiet", "detect", "-m", str(tmp_path / "m"), "--device", "cpu"]

    def warnings(*args):  # about geometry (the intensity checks have their own tests)
        caplog.clear()
        assert run([*detect, *args, "-o", str(tmp_path / f"out{len(list(tmp_path.glob('out*')))}")], capsys)[0] == 0
        return [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and r.name != "synomaly.input_checks"]

    assert warnings(str(tmp_path / "ras.nii.gz"), str(tmp_path / "lps.nii.gz")) == []
    (line,) = warnings(str(tmp_path / "fine.nii.gz"))
    assert line.startswith("fine.nii.gz: the model sees it at 0.4 x 0.4 mm per pixel where it was trained at 0.9 x 0.9")
    (line,) = warnings(str(tmp_path / "ras.nii.gz"), "--slice-axis", "0")
    assert line.startswith("ras.nii.gz: its slices run AIL") and "LPS" in line and "--slice-axis" in line
    assert warnings(str(disk_data / "png_lesioned" / "l0.png")) == []  # nothing to compare
    out = json.loads((tmp_path / "out0" / "summary.json").read_text())["cases"]
    assert out[0]["area_px"] == out[1]["area_px"]  # RAS and LPS storage: the same result


# --- outputs people can open ------------------------------------------------------------------------


def test_image_inputs_get_pictures_with_stated_scales_and_a_score_at_their_own_resolution(disk_data, tmp_path, capsys):
    from PIL import Image

    from synomaly.io import read_images

    model = tmp_path / "m"  # the intensity floor: its "reconstruction" is (x - 1) / 2, so each output is known in closed form
    assert run(["--quiet", "train", str(disk_data / "png_healthy"), "-o", str(model), "--method", "intensity", "--network",
                "tiny", "--image-size", "32", "--foreground", "none", "--device", "cpu"], capsys)[0] == 0
    base = ["--quiet", "detect", "-m", str(model), "--device", "cpu", "--threshold", "0.3", "--min-size", "0", "--kernel", "1"]
    png = disk_data / "png_lesioned" / "l0.png"  # 40x32: letterboxed to 40 and shrunk to 32 by the model, then restored
    assert run([*base, str(png), f"{disk_data / 'bundle.npz'}:anomalous", "-o", str(tmp_path / "out")], capsys)[0] == 0
    cases = {c["output"]: c for c in json.loads((tmp_path / "out" / "summary.json").read_text())["cases"]}
    case, folder = cases["l0"], tmp_path / "out" / "l0"
    assert case["files"]["mask"] == "mask.npy" and case["pictures"]["png"] == {
        "mask": "mask.png", "anomaly_map": "anomaly_map.png", "reconstruction": "reconstruction.png"}
    mask, amap = np.load(folder / "mask.npy")[0], np.load(folder / "anomaly_map.npy")[0]
    np.testing.assert_array_equal(np.asarray(Image.open(folder / "mask.png")), mask.astype(np.uint8) * 255)
    assert case["anomaly_map_255"] == pytest.approx(0.6) and "255 means 0.6" in case["scales"]["anomaly_map"]
    np.testing.assert_array_equal(np.asarray(Image.open(folder / "anomaly_map.png")),
                                  np.rint(np.clip(amap / 0.6, 0, 1) * 255).astype(np.uint8))
    assert np.asarray(Image.open(folder / "reconstruction.png")).dtype == np.uint8  # as the input
    assert case["score"] == [int(mask.sum())] and case["score_unit"].startswith("pixels of the 40x32 input")
    # An array of 12 slices: one PNG per slice, named by slice number.
    case, folder = cases["bundle__anomalous"], tmp_path / "out" / "bundle__anomalous"
    assert case["pictures"]["png"]["mask"] == "mask" and len(list((folder / "mask").glob("*.png"))) == 12
    # On the input's own scale: minmax maps each slice's min..max to [-1, 1], so (x - 1) / 2 comes back as (raw - min) / 2 + min
    # (32x32 slices on a 32 px model: no resizing, so exactly, up to rounding).
    raw = np.load(disk_data / "bundle.npz")["anomalous"][7].astype(np.float64)
    recon = np.asarray(Image.open(folder / "reconstruction" / "07.png")).astype(np.float64)
    assert np.abs(recon - ((raw - raw.min()) / 2 + raw.min())).max() <= 1
    assert "input's own intensities" in case["scales"]["reconstruction"]
    # TIFF only: one multi-page picture per output, which score reads as it reads .npy.
    assert run([*base, f"{disk_data / 'bundle.npz'}:anomalous", "-o", str(tmp_path / "tif"), "--format", "tiff"], capsys)[0] == 0
    case = json.loads((tmp_path / "tif" / "summary.json").read_text())["cases"][0]
    assert case["files"]["mask"] == "mask.tif" and not list((tmp_path / "tif").rglob("*.npy"))
    assert run([*base, str(png), "-o", str(tmp_path / "out"), "--format", "tiff", "--overwrite"], capsys)[0] == 0
    assert sorted(p.name for p in (tmp_path / "out" / "l0").glob("[amr]*")) == ["anomaly_map.tif", "mask.tif", "reconstruction.tif"]
    np.testing.assert_array_equal(read_images(tmp_path / "tif" / case["output"] / "mask.tif")[0] > 0,
                                  np.load(tmp_path / "out" / "bundle__anomalous" / "mask.npy") > 0)
    for name, fmt in (("tif", "tiff"), ("png_only", "png")):
        if fmt == "png":
            assert run([*base, f"{disk_data / 'bundle.npz'}:anomalous", "-o", str(tmp_path / name), "--format", fmt], capsys)[0] == 0
        scored = tmp_path / f"score_{name}"
        code, _, err = run(["--quiet", "score", str(tmp_path / name), "-r", f"{disk_data / 'bundle.npz'}:masks", "-o", str(scored)], capsys)
        assert code == 0, err
        assert json.loads((scored / "metrics.json").read_text())["aggregate"]["n_cases"] == 12
    code, _, err = run([*base, str(png), "-o", str(tmp_path / "bad"), "--format", "gif"], capsys)
    assert code == 2 and "--format" in err
