"""The method registry, the intensity floor, and the recipe options the ablations use."""

import json

import numpy as np
import pytest
import torch

from synomaly.config import DetectConfig, PipelineConfig, model_preset
from synomaly.detect import multistage_detect
from synomaly.errors import ConfigError
from synomaly.methods import METHODS, Method, get_method
from synomaly.noise import make_noise
from synomaly.pipeline import SynomalyPipeline
from synomaly.preprocess import Preprocessing, erode, normalize_fixed
from synomaly.schedule import DiffusionSchedule
from synomaly.train import TrainConfig, random_flips

SCHED = DiffusionSchedule()


def square_images(value: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Two 32x32 images at -0.2 with a 6x6 square at ``value`` in the first; the square's mask."""
    images = torch.full((2, 1, 32, 32), -0.2)
    mask = torch.zeros_like(images, dtype=torch.bool)
    mask[0, 0, 10:16, 12:18] = True
    return images.masked_fill(mask, value), mask


def test_every_registered_method_implements_the_interface():
    assert {"diffusion", "dae", "supervised", "intensity"} <= set(METHODS)
    for name, method in METHODS.items():
        assert isinstance(method, Method) and method.name == name and method.description
        assert type(method).reconstruct is not Method.reconstruct
        trains = type(method).training_step if method.manual_optimization else type(method).loss
        assert not method.trained or trains not in (Method.loss, Method.training_step)
        assert not method.manual_optimization or type(method).optimizers is not Method.optimizers


def test_unknown_method_lists_the_registered_ones():
    with pytest.raises(ConfigError, match="diffusion, dae, supervised, intensity, vae"):
        get_method("no-such-method")
    with pytest.raises(ConfigError, match="method"):
        PipelineConfig(method="no-such-method")


@pytest.mark.parametrize("direction, value", [(1, 0.9), (-1, -0.9)])
def test_intensity_flags_bright_or_dark_regions_by_the_preset_direction(direction, value):
    images, square = square_images(value)
    config = PipelineConfig(model=model_preset("tiny"), noise={"name": "synomaly", "direction": [direction]},
                            detect=DetectConfig(t=0, max_stages=1, kernel=1, threshold=0.9, min_size=0), method="intensity")
    pipe = SynomalyPipeline(get_method("intensity").build(config), config)
    out = pipe.detect(images)
    assert torch.equal(out.mask, square)
    expected = (1 + direction * images) / 2  # the map is the image itself, on [0, 1]
    assert torch.allclose(out.anomaly_map, expected, atol=1e-6)
    assert out.nfe.tolist() == [0, 0] and out.stages.tolist() == [1, 1]
    # Wrong polarity finds nothing: the square is at the other end of the scale.
    assert not pipe.detect(-images).mask.any()


def test_intensity_map_is_zero_outside_the_foreground():
    images, square = square_images(0.9)
    config = DetectConfig(t=0, max_stages=1, kernel=1, threshold=0.1, min_size=0)
    net = get_method("intensity").build(PipelineConfig(method="intensity", noise={"name": "synomaly", "direction": 1}))
    foreground = torch.zeros_like(square)
    foreground[..., :, :16] = True
    out = multistage_detect(net, SCHED, images, config, make_noise("gaussian"), foreground=foreground, method="intensity")
    assert (out.anomaly_map[~foreground] == 0).all() and out.mask[foreground].any() and not out.mask[~foreground].any()


def test_intensity_refuses_two_directions():
    with pytest.raises(ConfigError, match="noise.direction"):
        get_method("intensity").build(PipelineConfig(method="intensity", noise={"name": "synomaly", "direction": [1, -1]}))


def test_intensity_model_folder_has_no_weights_and_round_trips(tmp_path):
    from synomaly.commands import run_train

    images = (np.random.default_rng(0).random((6, 32, 32)) * 255).astype(np.uint8)
    np.savez(tmp_path / "d.npz", healthy=images)
    folder = run_train([f"{tmp_path / 'd.npz'}:healthy"], tmp_path / "model", model="tiny", image_size=32,
                       method="intensity", preprocess={"foreground": "auto", "foreground_erosion": 1},
                       train_config=TrainConfig(steps=5, progress=False, accelerator="cpu"))
    assert sorted(p.name for p in folder.iterdir()) == ["config.json"]
    config = json.loads((folder / "config.json").read_text())
    assert config["method"] == "intensity" and config["training"]["final_step"] == 0
    assert config["preprocess"]["foreground"] == "auto" and config["preprocess"]["foreground_erosion"] == 1
    pipe = SynomalyPipeline.from_pretrained(folder)
    out = pipe.detect(torch.rand(3, 1, 32, 32) * 2 - 1)
    assert out.mask.shape == (3, 1, 32, 32) and out.nfe.sum() == 0


def test_vae_kl_term_matches_the_closed_form_of_known_gaussians():
    from synomaly.methods.vae import gaussian_kl

    d = 7
    zero = torch.zeros(3, d)
    assert torch.equal(gaussian_kl(zero, zero), torch.zeros(3))  # the prior itself
    assert torch.allclose(gaussian_kl(torch.ones(1, d), zero), torch.tensor([d / 2]))  # a unit shift: |mu|^2 / 2
    var = 4.0  # KL(N(0, s^2) || N(0, 1)) = (s^2 - 1 - ln s^2) / 2 per dimension
    expected = d * (var - 1 - np.log(var)) / 2
    assert torch.allclose(gaussian_kl(zero[:1], torch.full((1, d), np.log(var))), torch.tensor([expected], dtype=torch.float32))


def test_vae_reconstructs_deterministically_at_the_models_size_and_trains(tmp_path, phantom_train):
    from synomaly.methods.vae import VAENet
    from synomaly.model import count_parameters
    from synomaly.train import train

    config = PipelineConfig(model=model_preset("tiny"), method="vae")
    net = get_method("vae").build(config)
    assert isinstance(net, VAENet) and count_parameters(net) <= 300_000
    x = phantom_train[:4]
    recon = get_method("vae").reconstruct(net.eval(), SCHED, x, DetectConfig(t=0), make_noise("gaussian"))
    assert recon.shape == x.shape and recon.abs().max() <= 1
    assert torch.equal(recon, get_method("vae").reconstruct(net, SCHED, x, DetectConfig(t=0), make_noise("gaussian")))
    folder = train(phantom_train[:128], tmp_path / "vae", model=model_preset("tiny"), noise={"name": "gaussian"},
                   method="vae", train_config=TrainConfig(steps=60, batch_size=16, lr=2e-3, ema_decay=0.0,
                                                          progress=False, preview_every=0, accelerator="cpu"))
    trained = SynomalyPipeline.from_pretrained(folder)
    before = (get_method("vae").reconstruct(net, SCHED, x, DetectConfig(t=0), make_noise("gaussian")) - x).abs().mean()
    after = (trained.reconstruct(x, t=0) - x).abs().mean()
    assert after < 0.5 * before  # 60 steps already learn the phantoms' intensity layout
    out = trained.detect(x, max_stages=1)
    assert out.mask.shape == x.shape and out.nfe.tolist() == [1, 1, 1, 1]  # one forward pass each


def test_erosion_shrinks_each_mask_but_never_empties_it():
    mask = np.zeros((3, 20, 20), dtype=bool)
    mask[0, 5:15, 5:15] = True
    mask[1, 9:11, 9:11] = True  # erodes away: kept whole
    mask[2] = True  # touches the border: the border does not erode it
    out = erode(mask, 2)
    assert out[0].sum() == 36 and out[0, 7:13, 7:13].all()
    assert np.array_equal(out[1], mask[1]) and out[2].all()
    assert np.array_equal(erode(mask, 0), mask)


def test_preprocessing_erodes_the_foreground_and_can_keep_a_fixed_scale():
    raw = np.zeros((2, 32, 32), dtype=np.float32)
    raw[:, 6:26, 6:26] = 100.0
    raw[1, 6:26, 6:26] = 200.0
    plain = Preprocessing(size=32, foreground="auto").apply(raw)[1]
    eroded = Preprocessing(size=32, foreground="auto", foreground_erosion=3).apply(raw)[1]
    assert plain.sum() == 2 * 400 and eroded.sum() == 2 * 196
    minmax = Preprocessing(size=32).apply(raw)[0]
    fixed = Preprocessing(size=32, normalization="fixed", intensity_range=(0, 255)).apply(raw)[0]
    assert minmax[0].max() == minmax[1].max() == 1.0  # per-slice min-max loses the brightness difference
    assert fixed[0].max() == pytest.approx(100 / 127.5 - 1) and fixed[1].max() == pytest.approx(200 / 127.5 - 1)
    assert np.allclose(normalize_fixed(np.array([[[-10.0, 300.0]]]), 0, 255), [[[-1.0, 1.0]]])


@pytest.mark.parametrize("option, problem", [
    ({"foreground_erosion": -1}, "foreground_erosion"), ({"foreground_erosion": 1.5}, "foreground_erosion"),
    ({"normalization": "zscore"}, "normalization"), ({"intensity_range": (5, 5)}, "intensity_range"),
    ({"intensity_range": (0, float("nan"))}, "intensity_range"),
])
def test_bad_preprocessing_options_name_the_field(option, problem):
    with pytest.raises(ConfigError, match=problem):
        Preprocessing(**option)


def test_horizontal_flips_never_turn_an_image_upside_down():
    torch.manual_seed(0)
    images = torch.arange(16.0).view(1, 1, 4, 4).repeat(64, 1, 1, 1)
    flipped, = random_flips(images, dims=(-1,))
    upright = torch.isin(flipped, images[:1]) & (flipped[:, :, :1].amax(dim=(2, 3), keepdim=True) < 4)
    assert upright.all() and (flipped != images).any()
    assert TrainConfig(flips=True).flips == "both" and TrainConfig(flips=False).flips == "none"
    with pytest.raises(ConfigError, match="train.flips"):
        TrainConfig(flips="diagonal")


def test_foreground_masks_from_an_npz_key_replace_the_computed_foreground(tmp_path):
    from synomaly.cli import main

    rng = np.random.default_rng(0)
    images = (rng.random((4, 32, 32)) * 60).astype(np.uint8)
    images[:, 8:14, 20:26] = 250  # bright squares on the right half
    left = np.zeros_like(images)
    left[:, :, :16] = 1
    np.savez(tmp_path / "d.npz", images=images, left=left, wrong=left[:, :20])
    model = tmp_path / "model"
    assert main(["--quiet", "train", f"{tmp_path / 'd.npz'}:images", "-o", str(model), "--method", "intensity",
                 "--network", "tiny", "--image-size", "32", "--foreground", "given",
                 "--foreground-masks", f"{tmp_path / 'd.npz'}:left"]) == 0
    assert json.loads((model / "config.json").read_text())["preprocess"]["foreground"] == "given"
    out = tmp_path / "out"
    args = ["--quiet", "detect", f"{tmp_path / 'd.npz'}:images", "-m", str(model), "-o", str(out), "--threshold", "0.5",
            "--min-size", "0", "--on-error", "stop"]
    assert main([*args, "--foreground-masks", f"{tmp_path / 'd.npz'}:left"]) == 0
    case = json.loads((out / "summary.json").read_text())["cases"][0]
    assert case["score"] == [0.0] * 4  # the squares lie outside the given foreground
    # A model whose foreground is 'given' refuses inputs without one, naming the option.
    assert main([*args, "--overwrite"]) == 2
    assert main([*args, "--overwrite", "--foreground-masks", f"{tmp_path / 'd.npz'}:wrong"]) == 2


def test_computed_foreground_is_used_without_masks_and_erosion_is_recorded(tmp_path):
    from synomaly.cli import main

    images = np.zeros((4, 32, 32), dtype=np.uint8)
    images[:, 4:28, 4:28] = 100
    images[:, 12:16, 12:16] = 250
    np.savez(tmp_path / "d.npz", images=images)
    model = tmp_path / "model"
    assert main(["--quiet", "train", f"{tmp_path / 'd.npz'}:images", "-o", str(model), "--method", "intensity",
                 "--network", "tiny", "--image-size", "32", "--foreground", "auto", "--foreground-erosion", "2"]) == 0
    pre = json.loads((model / "config.json").read_text())["preprocess"]
    assert pre["foreground"] == "auto" and pre["foreground_erosion"] == 2
    out = tmp_path / "out"
    assert main(["--quiet", "detect", f"{tmp_path / 'd.npz'}:images", "-m", str(model), "-o", str(out),
                 "--threshold", "0.9", "--min-size", "0", "--kernel", "1"]) == 0
    assert json.loads((out / "summary.json").read_text())["cases"][0]["score"] == [16.0] * 4


@pytest.mark.parametrize("preset, flips, foreground", [("brain-flair", "horizontal", "auto"), ("ultrasound", "horizontal", "disk"),
                                                     ("carotid-ultrasound", "both", "disk")])
def test_presets_set_the_recipe_unless_told_otherwise(tmp_path, preset, flips, foreground):
    from synomaly.commands import run_train

    images = (np.random.default_rng(0).random((4, 32, 32)) * 255).astype(np.uint8)
    np.savez(tmp_path / "d.npz", x=images)
    quick = {"steps": 1, "batch_size": 4, "progress": False, "accelerator": "cpu", "preview_every": 0}
    folder = run_train([f"{tmp_path / 'd.npz'}:x"], tmp_path / "m", preset=preset, model="tiny", image_size=32,
                       train_config=TrainConfig(**quick))
    config = json.loads((folder / "config.json").read_text())
    assert config["training"]["flips"] == flips and config["preprocess"]["foreground"] == foreground
    assert config["preprocess"]["foreground_erosion"] == (2 if preset == "brain-flair" else 0)  # 8 px at 128, scaled to 32
    folder = run_train([f"{tmp_path / 'd.npz'}:x"], tmp_path / "m2", preset=preset, model="tiny", image_size=32,
                       train_config=TrainConfig(**quick, flips="none"), preprocess={"foreground": "none"})
    config = json.loads((folder / "config.json").read_text())
    assert config["training"]["flips"] == "none" and config["preprocess"]["foreground"] == "none"


def test_vae_refuses_an_image_size_its_levels_do_not_divide():
    with pytest.raises(ConfigError, match="model.image_size: the vae halves the image 3 times, so it needs a multiple of 8"):
        get_method("vae").build(PipelineConfig(model=model_preset("tiny", image_size=36), method="vae"))
