"""f-AnoGAN: networks, the WGAN-GP penalty, the phases of training, resume, the image score, and the command line."""

import csv
import json

import numpy as np
import pytest
import torch
from torch import nn

from synomaly.cli import main
from synomaly.config import DetectConfig, PipelineConfig, model_preset
from synomaly.errors import ConfigError
from synomaly.methods import get_method
from synomaly.methods.fanogan import (
    CRITIC_STEPS,
    MIN_STEPS,
    PENALTY,
    PHASES,
    FAnoGAN,
    FAnoGANNet,
    combined_residual,
    gan_steps,
    gradient_penalty,
    phase,
)
from synomaly.model import count_parameters
from synomaly.noise import make_noise
from synomaly.pipeline import SynomalyPipeline
from synomaly.schedule import DiffusionSchedule
from synomaly.train import TrainConfig, train

METHOD = get_method("fanogan")


def build(size=32, seed=0):
    torch.manual_seed(seed)
    return METHOD.build(PipelineConfig(model=model_preset("tiny", image_size=size), method="fanogan"))


def images(n=4, size=32, seed=0):
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def quick(steps, **kw):
    return TrainConfig(**{"steps": steps, "batch_size": 4, "lr": 1e-3, "checkpoint_every": 5, "preview_every": 0,
                          "log_every": 1, "progress": False, "accelerator": "cpu", **kw})


@pytest.mark.parametrize("size", [16, 32])
def test_networks_have_the_shapes_of_the_preset(size):
    net = build(size)
    assert isinstance(net, FAnoGANNet) and count_parameters(net) <= 300_000
    x = images(3, size)
    side = size // 8  # three stride-2 levels of the tiny preset
    assert net.encoder(x).shape == (3, 128)
    assert net.critic(x).shape == (3,) and net.critic.features(x).shape == (3, 8 * side**2)
    fake = net.sample(5)
    assert fake.shape == (5, 1, size, size) and fake.abs().max() <= 1
    recon = METHOD.reconstruct(net, DiffusionSchedule(), x, DetectConfig(t=0), make_noise("gaussian"))
    assert recon.shape == x.shape and recon.abs().max() <= 1
    score = combined_residual(net.critic, x, recon)
    assert score.shape == (3,) and (score > 0).all()
    assert torch.equal(combined_residual(net.critic, x, x), torch.zeros(3))


@pytest.mark.parametrize("scale", [0.25, 1.0, 3.0])
def test_gradient_penalty_of_a_linear_critic_is_lambda_times_the_squared_norm_gap(scale):
    # D(x) = w . x has the gradient w everywhere, so the penalty is lambda * (||w|| - 1)^2 whatever the images.
    critic = nn.Sequential(nn.Flatten(), nn.Linear(16 * 16, 1, bias=False))
    with torch.no_grad():
        critic[1].weight.copy_(torch.randn(1, 256, generator=torch.Generator().manual_seed(1)))
        critic[1].weight.mul_(scale / critic[1].weight.norm())
    real, fake = images(6, 16, seed=2), images(6, 16, seed=3)
    penalty = gradient_penalty(lambda x: critic(x).squeeze(1), real, fake)
    assert penalty.item() == pytest.approx(PENALTY * (scale - 1.0) ** 2, rel=1e-5, abs=1e-9)
    # The graph is kept: d/dw of lambda (||w|| - 1)^2 is 2 lambda (||w|| - 1) w / ||w||.
    penalty.backward()
    w = critic[1].weight.detach()
    assert torch.allclose(critic[1].weight.grad, 2 * PENALTY * (scale - 1.0) * w / scale, atol=1e-5)


def test_sampling_and_the_penalty_repeat_with_a_generator_and_reconstruction_is_deterministic():
    a, b = build(seed=0), build(seed=0)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert torch.equal(a.sample(3, torch.Generator().manual_seed(7)), b.sample(3, torch.Generator().manual_seed(7)))
    assert not torch.equal(a.sample(3, torch.Generator().manual_seed(7)), a.sample(3, torch.Generator().manual_seed(8)))
    real, fake = images(4), images(4, seed=1)
    first, second = (gradient_penalty(a.critic, real, fake, generator=torch.Generator().manual_seed(3)) for _ in range(2))
    assert torch.equal(first, second)
    x = images(4)
    assert torch.equal(a(x), b(x)) and torch.equal(a(x), a(x))


def test_the_budget_splits_into_whole_gan_cycles_then_the_encoder():
    assert gan_steps(1500) == 996 and gan_steps(1500) % (CRITIC_STEPS + 1) == 0  # the cpu profile: 166 cycles, 504 encoder updates
    assert [phase(s, 24) for s in range(14)] == ["critic"] * 5 + ["generator"] + ["critic"] * 5 + ["generator"] + ["encoder"] * 2
    assert MIN_STEPS == 9 and gan_steps(MIN_STEPS) == CRITIC_STEPS + 1 and gan_steps(MIN_STEPS - 1) == 0


@pytest.mark.parametrize("step, trained", [(0, "critic"), (5, "generator"), (12, "encoder")])
def test_each_update_changes_exactly_one_network(step, trained):
    net = build()
    optimizers = FAnoGAN().optimizers(net, TrainConfig(lr=1e-2))
    before = {name: [p.detach().clone() for p in getattr(net, name).parameters()] for name in PHASES}
    logged = METHOD.training_step(net, optimizers, step, 24, images(4), None, lambda loss: loss.backward())
    assert torch.isfinite(logged["loss"]) and logged["phase"].item() == PHASES.index(trained)
    assert torch.equal(logged[f"{trained}_loss"], logged["loss"])
    assert all(torch.isnan(logged[f"{other}_loss"]) for other in PHASES if other != trained)
    for name in PHASES:
        changed = any(not torch.equal(p, q) for p, q in zip(getattr(net, name).parameters(), before[name]))
        assert changed == (name == trained), name
    assert all(p.requires_grad for p in net.parameters())  # the frozen networks are unfrozen again


def test_the_image_score_is_the_combined_residual_of_the_reconstruction():
    config = PipelineConfig(model=model_preset("tiny"), method="fanogan", detect=DetectConfig(t=0, max_stages=1))
    torch.manual_seed(0)
    pipe = SynomalyPipeline(METHOD.build(config), config)
    x = images(3)
    out = pipe.detect(x)
    with torch.no_grad():
        expected = combined_residual(pipe.unet.critic, x, pipe.unet(x))
    assert torch.allclose(out.score, expected) and out.nfe.tolist() == [1, 1, 1]
    assert "combined residual" in METHOD.score_unit(32) and "mask pixels" in get_method("vae").score_unit(32)


def test_train_with_the_command_line_writes_a_folder_that_detect_loads(tmp_path, capsys):
    from synomaly.synthetic import healthy_phantoms

    healthy = healthy_phantoms(20, 32, torch.Generator().manual_seed(0))[0][:, 0]
    np.savez(tmp_path / "d.npz", healthy=((healthy + 1) * 127.5).round().numpy().astype(np.uint8))
    model = tmp_path / "model"
    assert main(["--quiet", "train", f"{tmp_path / 'd.npz'}:healthy", "-o", str(model), "--method", "fanogan", "--model", "tiny",
                 "--image-size", "32", "--train.steps", "12", "--batch-size", "4", "--train.preview_every", "12", "--device", "cpu"]) == 0
    config = json.loads((model / "config.json").read_text())
    assert config["method"] == "fanogan" and config["training"]["final_step"] == 12
    assert config["detect"]["t"] == 0 and config["detect"]["max_stages"] == 1
    assert (model / "previews" / "step_0000012.png").is_file()
    out = tmp_path / "detect"
    assert main(["--quiet", "detect", f"{tmp_path / 'd.npz'}:healthy", "-m", str(model), "-o", str(out), "--device", "cpu"]) == 0
    case = json.loads((out / "summary.json").read_text())["cases"][0]
    assert len(case["score"]) == 20 and all(np.isfinite(case["score"])) and min(case["score"]) > 0
    assert "combined residual" in case["score_unit"]


def logged_phases(folder):
    rows = csv.DictReader((folder / "logs" / "version_0" / "metrics.csv").read_text().splitlines())
    return {int(row["step"]): float(row["train/phase"]) for row in rows if row.get("train/phase")}


def interrupt_at(monkeypatch, stop):
    """Make the update at global step ``stop`` fail, as a killed process would stop there."""
    original = FAnoGAN.training_step

    def failing(self, network, optimizers, step, *args):
        if step == stop:
            raise RuntimeError(f"interrupted at step {step}")
        return original(self, network, optimizers, step, *args)

    monkeypatch.setattr(FAnoGAN, "training_step", failing)


def test_resume_continues_the_step_count_and_the_planned_phases(tmp_path, monkeypatch):
    x = images(16)
    run = {"model": model_preset("tiny"), "noise": {"name": "gaussian"}, "method": "fanogan"}
    with monkeypatch.context() as patch:  # stopped in the GAN phase; the last checkpoint is at step 10
        interrupt_at(patch, 13)
        with pytest.raises(RuntimeError, match="interrupted at step 13"):
            train(x, tmp_path, train_config=quick(24), **run)
    assert not (tmp_path / "model.safetensors").exists()
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 10 and checkpoint["synomaly_planned_steps"] == 24
    # Resumed with a longer budget: the run keeps the split it began with (the GAN phase ends at step 12 of 24,
    # where a fresh run of 30 would end it at 18), so every update from step 12 on trains the encoder.
    train(x, tmp_path, train_config=quick(30), resume=True, **run)
    assert json.loads((tmp_path / "config.json").read_text())["training"]["final_step"] == 30
    phases = logged_phases(tmp_path)
    assert sorted(phases) == list(range(30))
    assert [PHASES[int(phases[s])] for s in range(30)] == [phase(s, 24) for s in range(30)]
    assert [s for s in phases if phases[s] == PHASES.index("generator")] == [5, 11] and gan_steps(30) == 18
    from safetensors.torch import load_file

    exported = load_file(tmp_path / "model.safetensors")  # the trained weights, no moving average
    final = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert final["global_step"] == 30 and "current_model_state" not in final
    assert all(torch.equal(exported[k], final["state_dict"][f"unet.{k}"]) for k in exported)


def test_bad_settings_are_one_line_errors_naming_the_option(tmp_path, capsys):
    x = images(8)
    with pytest.raises(ConfigError, match=f"train.steps: fanogan needs at least {MIN_STEPS} steps"):
        train(x, tmp_path / "a", model=model_preset("tiny"), noise={"name": "gaussian"}, method="fanogan", train_config=quick(8))
    with pytest.raises(ConfigError, match="train.devices: fanogan trains on one device"):
        METHOD.check_training(quick(20, devices=2))
    with pytest.raises(ConfigError, match="model.image_size: fanogan halves the image 3 times"):
        METHOD.build(PipelineConfig(model=model_preset("tiny", image_size=36), method="fanogan"))
    code = main(["--quiet", "train", str(tmp_path / "missing.npz:healthy"), "-o", str(tmp_path / "m"), "--method", "fanogan",
                 "--model", "tiny", "--image-size", "32", "--train.steps", "4", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "train.steps" in err and len(err.strip().splitlines()) == 1  # refused before any data is read
