"""Training: model folder product, resume (also after SIGKILL), 2-process DDP on CPU, bf16, previews."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from synomaly import SynomalyPipeline
from synomaly.config import model_preset
from synomaly.errors import ConfigError, OutputExistsError
from synomaly.train import TrainConfig, random_flips, train

NOISE = {"name": "synomaly", "sigma": 1.0}


def quick(steps, **kw):
    return TrainConfig(**{"steps": steps, "batch_size": 4, "checkpoint_every": 5, "preview_every": 0,
                          "progress": False, "accelerator": "cpu", "log_every": 2, **kw})


@pytest.fixture(scope="module")
def images():
    return torch.rand(16, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1


def final_step(folder):
    return json.loads((folder / "config.json").read_text())["training"]["final_step"]


def test_training_writes_a_loadable_model_folder_with_previews(images, tmp_path):
    train(images, tmp_path, model=model_preset("tiny"), noise=NOISE, train_config=quick(6, preview_every=3))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["noise"] == NOISE and config["training"]["final_step"] == 6
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert (tmp_path / "logs" / "version_0" / "metrics.csv").is_file()
    from PIL import Image

    preview = np.asarray(Image.open(tmp_path / "previews" / "step_0000006.png"))
    assert preview.shape == (3 * 32, 4 * 32) and preview.std() > 10
    SynomalyPipeline.from_pretrained(tmp_path).detect(images[:2])
    assert not list(tmp_path.rglob("*.tmp*"))


def test_a_run_shorter_than_the_preview_interval_still_gets_a_preview_of_its_final_model(images, tmp_path):
    train(images, tmp_path, model=model_preset("tiny"), noise=NOISE, train_config=quick(4, preview_every=500))
    assert sorted(p.name for p in (tmp_path / "previews").iterdir()) == ["step_0000004.png"]


def test_exported_weights_are_the_moving_average(images, tmp_path):
    train(images, tmp_path, model=model_preset("tiny"), noise=NOISE, train_config=quick(5, ema_decay=0.5))
    # Lightning's EMA callback keeps the average in the checkpoint's state_dict, the raw weights beside it.
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    average = {k.removeprefix("unet."): v for k, v in state["state_dict"].items()}
    raw = {k.removeprefix("unet."): v for k, v in state["current_model_state"].items()}
    from safetensors.torch import load_file

    exported = load_file(tmp_path / "model.safetensors")
    assert all(torch.equal(exported[k], average[k]) for k in exported)
    assert any(not torch.equal(exported[k], raw[k]) for k in exported if exported[k].is_floating_point())


def test_existing_run_is_not_overwritten_and_resume_continues(images, tmp_path):
    train(images, tmp_path, model=model_preset("tiny"), noise=NOISE, train_config=quick(10))
    with pytest.raises(OutputExistsError, match="--resume"):
        train(images, tmp_path, model=model_preset("tiny"), noise=NOISE, train_config=quick(15))
    train(images, tmp_path, model=model_preset("tiny"), noise=NOISE, train_config=quick(15), resume=True)
    assert final_step(tmp_path) == 15
    rows = (tmp_path / "logs" / "version_0" / "metrics.csv").read_text().splitlines()
    assert len(rows) > 1


KILL_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from synomaly.config import model_preset
    from synomaly.train import TrainConfig, train
    images = torch.rand(16, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    config = TrainConfig(steps=int(sys.argv[2]), batch_size=4, checkpoint_every=5, preview_every=0,
                         progress=False, accelerator="cpu", devices=int(sys.argv[3]),
                         strategy="ddp" if int(sys.argv[3]) > 1 else "auto")
    train(images, sys.argv[1], model=model_preset("tiny"), noise={"name": "synomaly", "sigma": 1.0},
          train_config=config, resume=True)
    """
)


def run_script(tmp_path, out, steps, devices=1, **popen):
    script = tmp_path / "train_script.py"
    script.write_text(KILL_SCRIPT)
    return subprocess.Popen([sys.executable, str(script), str(out), str(steps), str(devices)], **popen)


def wait_for_checkpoint(proc, out, extra: float):
    """Wait until the training in ``proc`` wrote its first checkpoint (and ``extra`` seconds more); it must still run."""
    checkpoint = out / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(extra)
    assert proc.poll() is None, "training finished before it could be stopped"
    return checkpoint


def test_sigkill_mid_training_then_resume_reaches_the_same_step(tmp_path):
    out = tmp_path / "run"
    proc = run_script(tmp_path, out, 400, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = wait_for_checkpoint(proc, out, 0.5)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "model.safetensors").exists()
    torch.load(checkpoint, weights_only=True)  # the checkpoint on disk is complete
    resumed = run_script(tmp_path, out, 400, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = resumed.communicate(timeout=900)[0]
    assert resumed.returncode == 0, log
    assert "Restored all states" in log
    assert final_step(out) == 400


def test_two_process_ddp_on_cpu(tmp_path):
    out = tmp_path / "ddp"
    proc = run_script(tmp_path, out, 6, devices=2, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, log
    training = json.loads((out / "config.json").read_text())["training"]
    assert training["world_size"] == 2 and training["final_step"] == 6


def test_bf16_training_on_cpu(images, tmp_path):
    train(images, tmp_path, model=model_preset("tiny"), noise=NOISE, train_config=quick(2, precision="bf16"))
    assert final_step(tmp_path) == 2


def test_training_images_must_match_the_model_size(images, tmp_path):
    with pytest.raises(ValueError, match="model.image_size is 64"):
        train(images, tmp_path, model=model_preset("small"), noise=NOISE, train_config=quick(1))


@pytest.mark.parametrize("field, value", [("steps", 0), ("loss", "l1"), ("precision", "fp8"), ("ema_decay", 1.0)])
def test_train_config_validation(field, value):
    with pytest.raises(ConfigError, match=f"train.{field}"):
        TrainConfig(**{field: value})


def test_random_flips_flip_images_and_foregrounds_together():
    torch.manual_seed(0)
    images = torch.arange(64 * 16, dtype=torch.float32).reshape(64, 1, 4, 4)
    flipped, fg = random_flips(images, images.clone())
    torch.testing.assert_close(flipped, fg)
    variants = {
        "none": images, "h": images.flip(-1), "v": images.flip(-2), "hv": images.flip(-1).flip(-2)
    }
    seen = {name for i in range(64) for name, v in variants.items() if torch.equal(flipped[i], v[i])}
    assert seen == set(variants)


@pytest.mark.parametrize("method", ["dae", "supervised"])
def test_baseline_methods_train_into_loadable_model_folders(images, tmp_path, method):
    target = (images > 0.5) if method == "supervised" else None
    noise = {"name": "coarse"} if method == "dae" else {"name": "gaussian"}
    train(images, tmp_path, model=model_preset("tiny"), noise=noise, train_config=quick(3), method=method, target=target)
    pipe = SynomalyPipeline.from_pretrained(tmp_path)
    assert pipe.config.method == method
    out = pipe.detect(images[:2], t=0, max_stages=1)
    assert out.nfe.tolist() == [1, 1] and torch.isfinite(out.anomaly_map).all()


def test_supervised_training_needs_masks_and_only_it(images, tmp_path):
    with pytest.raises(ValueError, match="lesion masks"):
        train(images, tmp_path / "a", model=model_preset("tiny"), noise=NOISE, train_config=quick(1), method="supervised")
    with pytest.raises(ValueError, match="lesion masks"):
        train(images, tmp_path / "b", model=model_preset("tiny"), noise=NOISE, train_config=quick(1), target=images > 0)


def test_a_diverging_training_stops_with_one_line_and_writes_no_model(tmp_path, capsys):
    from synomaly.cli import main

    images = (np.random.default_rng(0).random((8, 32, 32)) * 255).astype(np.uint8)
    np.savez(tmp_path / "d.npz", images=images)
    out = tmp_path / "model"
    code = main(["--quiet", "train", f"{tmp_path / 'd.npz'}:images", "-o", str(out), "--network", "tiny", "--image-size", "32",
                 "--device", "cpu", "--train.steps", "30", "--train.lr", "1e30", "--train.grad-clip", "0",
                 "--train.progress", "false", "--batch-size", "4"])
    err = capsys.readouterr().err
    assert code == 2 and "diverged" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (out / "model.safetensors").exists()


def test_weights_with_nan_are_refused_on_loading(tiny_model_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from synomaly.errors import InputError
    from synomaly.pipeline import SynomalyPipeline

    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy, ignore=shutil.ignore_patterns("checkpoints", "logs", "previews"))
    state = load_file(copy / "model.safetensors")
    name = sorted(state)[0]
    state[name] = torch.full_like(state[name], float("nan"))
    save_file(state, copy / "model.safetensors")
    with pytest.raises(InputError, match="NaN or infinite"):
        SynomalyPipeline.from_pretrained(copy)


def test_resume_of_a_finished_run_changes_nothing_and_new_weights_retire_old_thresholds(images, tmp_path):
    train(images, tmp_path, model=model_preset("tiny"), noise=NOISE, train_config=quick(4))
    (tmp_path / "thresholds.json").write_text('{"detect": {"threshold": 0.3}}')
    weights = (tmp_path / "model.safetensors").read_bytes()
    train(images, tmp_path, model=model_preset("tiny"), noise=NOISE, train_config=quick(4), resume=True)
    assert (tmp_path / "model.safetensors").read_bytes() == weights  # the EMA export is kept, not the raw weights
    assert (tmp_path / "thresholds.json").exists()
    train(images, tmp_path, model=model_preset("tiny"), noise=NOISE, train_config=quick(6), resume=True)
    assert final_step(tmp_path) == 6 and not (tmp_path / "thresholds.json").exists()
    assert (tmp_path / "thresholds.previous.json").exists()
    (tmp_path / "thresholds.json").write_text('{"detect": {"threshold": 0.3}}')
    train(images, tmp_path, model=model_preset("tiny"), noise=NOISE, train_config=quick(2), overwrite=True)
    assert final_step(tmp_path) == 2 and not (tmp_path / "thresholds.json").exists()


def test_sigterm_stops_training_with_a_nonzero_status_and_resume_keeps_the_loss_log(tmp_path):
    data = tmp_path / "d.npz"
    np.savez(data, images=(np.random.default_rng(0).random((16, 32, 32)) * 255).astype(np.uint8))
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "synomaly.cli", "train", f"{data}:images", "-o", str(out), "--network", "tiny",
            "--image-size", "32", "--device", "cpu", "--batch-size", "4", "--train.steps", "400",
            "--train.checkpoint-every", "5", "--train.log-every", "1", "--train.progress", "false"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_checkpoint(proc, out, 1.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "stopped by SIGTERM" in err and "--resume" in err and "Traceback" not in err
    assert not (out / "model.safetensors").exists()
    rows_before = (out / "logs" / "version_0" / "metrics.csv").read_text().splitlines()
    resumed = subprocess.run([*argv, "--resume"], capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr
    assert final_step(out) == 400
    rows_after = (out / "logs" / "version_0" / "metrics.csv").read_text().splitlines()
    steps_after = [int(row.split(",")[1]) for row in rows_after[1:]]
    assert steps_after == sorted(steps_after) and steps_after[-1] == 399  # one log, from the first step to the last
    kept = [row for row in rows_before[1:] if int(row.split(",")[1]) < 5]
    assert kept and rows_after[1 : 1 + len(kept)] == kept  # the rows before the first checkpoint survive the resume
