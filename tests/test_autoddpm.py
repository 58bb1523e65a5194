"""AutoDDPM (the diffusion method's ``autoddpm`` sampler): its map, mask, RePaint inpainting, cost and settings."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage
from test_detect import SCHED, HealingModel, gaussian, lesion_images, zeros

from synomaly.config import DetectConfig, PipelineConfig, ScheduleConfig, model_preset
from synomaly.detect import multistage_detect, reconstruct, stage_cost
from synomaly.errors import ConfigError
from synomaly.maps import difference_map
from synomaly.methods.autoddpm import (
    autoddpm_reconstruction,
    dilate,
    image_quantile,
    inpainting_mask,
    perceptual_residual_map,
    repaint,
    ssim_dissimilarity,
)
from synomaly.methods.diffusion import chain_reconstruction

AUTO = {"sampler": "autoddpm", "t": 250, "chain_steps": 3, "inpaint_t": 4, "resamplings": 3, "max_stages": 1,
        "kernel": 1, "threshold": 0.01, "min_size": 0}


class Recorder(HealingModel):
    """A healing model that also records the timestep of every call."""

    def __init__(self) -> None:
        super().__init__()
        self.timesteps: list[int] = []

    def forward(self, x_t, t):
        self.timesteps.append(int(t[0]))
        return super().forward(x_t, t)


def test_ssim_dissimilarity_is_monais_local_ssim_inside_and_keeps_the_size():
    from monai.metrics.regression import compute_ssim_and_cs

    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(2, 1, 24, 20, generator=g) * 2 - 1, torch.rand(2, 1, 24, 20, generator=g) * 2 - 1
    d = ssim_dissimilarity(a, b)
    ssim, _ = compute_ssim_and_cs(b, a, spatial_dims=2, kernel_size=(11, 11), kernel_sigma=(1.5, 1.5), data_range=2.0)
    assert d.shape == a.shape and d.min() >= 0 and d.max() <= 1
    torch.testing.assert_close(d[..., 5:-5, 5:-5], (1 - ssim) / 2, atol=1e-6, rtol=0)
    assert ssim_dissimilarity(a, a.clone()).abs().max() < 1e-5


def test_image_quantile_is_numpys_percentile_per_image():
    maps = torch.randn(4, 1, 7, 9, generator=torch.Generator().manual_seed(1))
    expected = np.percentile(maps.flatten(1).numpy(), 95, axis=1)
    np.testing.assert_allclose(image_quantile(maps, 0.95).flatten().numpy(), expected, rtol=1e-6)


def test_perceptual_residual_map_is_dssim_times_the_clipped_normalised_residual():
    images, disk = lesion_images()
    recon = images.clamp(max=0.2)
    weight = perceptual_residual_map(images, recon)
    # The lesion is 8 % of the image, so the residual's 95th percentile is the lesion's 0.7 and the scaled residual is the disk.
    torch.testing.assert_close(weight, ssim_dissimilarity(images, recon) * disk.float())
    assert weight.min() >= 0 and weight.max() <= 1 and weight[disk].min() > 0


def test_dilation_is_a_square_of_the_given_side():
    masks = torch.rand(3, 1, 16, 12, generator=torch.Generator().manual_seed(2)) > 0.93
    for size in (3, 5):
        expected = ndimage.binary_dilation(masks.numpy(), structure=np.ones((1, 1, size, size), bool))
        assert np.array_equal(dilate(masks, size).numpy(), expected)
    assert torch.equal(dilate(masks, 1), masks)


def test_mask_threshold_or_the_95th_percentile_selects_the_map():
    weight = torch.linspace(0, 1, 400).reshape(1, 1, 20, 20)
    assert inpainting_mask(weight, DetectConfig(dilation=1)).sum() == 20  # the top 5 %
    assert inpainting_mask(weight, DetectConfig(dilation=1, mask_threshold=0.5)).sum() == 200


def test_noise_free_inpainting_by_a_healing_model_heals_exactly_the_mask_and_keeps_the_rest():
    images, disk = lesion_images()
    config = DetectConfig(**{**AUTO, "mask_threshold": 1e-3})
    first = chain_reconstruction(HealingModel(), SCHED, images, 250, 3, zeros)
    out, weight = autoddpm_reconstruction(HealingModel(), SCHED, images, first, config, zeros)
    mask = inpainting_mask(weight, config)
    assert mask[disk].all() and not mask.all()  # the lesion and its dilated rim
    assert torch.equal(out[~mask], images[~mask])
    torch.testing.assert_close(out, images.clamp(max=0.2), atol=1e-4, rtol=0)


def test_repaint_keeps_the_known_region_exactly_with_random_noise():
    images, disk = lesion_images(n=3)
    mask = dilate(disk, 3)
    start = torch.rand(images.shape, generator=torch.Generator().manual_seed(4)) * 2 - 1
    out = repaint(HealingModel(), SCHED, images, start, mask, 6, 2, gaussian, torch.Generator().manual_seed(5))
    assert torch.equal(out[~mask], images[~mask])
    assert not torch.equal(out[mask], images[mask]) and out.abs().max() <= 1


def test_detection_map_is_the_inpainted_residual_times_the_first_map():
    images, disk = lesion_images()
    out, model = run_auto(images, kernel=3)
    first = chain_reconstruction(HealingModel(), SCHED, images, 250, 3, gaussian, torch.Generator().manual_seed(0))
    weight = perceptual_residual_map(images, first)
    torch.testing.assert_close(out.anomaly_map, difference_map(images, out.reconstruction, 3) * weight)
    assert torch.equal(out.mask, out.anomaly_map >= 0.01)
    assert out.anomaly_map[disk].mean() > 3 * out.anomaly_map[~disk].mean()


def test_network_evaluations_are_the_chain_then_resamplings_per_inpainting_timestep():
    images, _ = lesion_images()
    out, model = run_auto(images)
    assert model.timesteps == [250, 125, 0] + [4] * 3 + [3] * 3 + [2] * 3 + [1] * 3
    assert out.nfe.tolist() == [15, 15] and stage_cost(DetectConfig(**AUTO)) == 15
    assert reconstruct(HealingModel(), SCHED, images, DetectConfig(**AUTO), gaussian).nfe == 15


def test_same_generator_gives_the_same_result_and_another_seed_another(random_pipeline):
    images = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(6)) * 2 - 1
    settings = {key: AUTO[key] for key in ("sampler", "t", "chain_steps", "inpaint_t", "resamplings", "max_stages")}

    def detect(seed):
        return random_pipeline.detect(images, torch.Generator().manual_seed(seed), **settings)

    first, again, other = detect(0), detect(0), detect(1)
    assert torch.equal(first.anomaly_map, again.anomaly_map) and torch.equal(first.reconstruction, again.reconstruction)
    assert not torch.equal(first.reconstruction, other.reconstruction)
    assert first.anomaly_map.shape == first.reconstruction.shape == images.shape and first.nfe.tolist() == [15] * 3


@pytest.mark.parametrize("field, value, message", [
    ("resamplings", 0, "detect.resamplings: must be >= 1"),
    ("resamplings", 10**6, "detect.resamplings: must be <= 1000 (the limit)"),
    ("inpaint_t", 0, "detect.inpaint_t: must be >= 1"),
    ("dilation", 4, "detect.dilation: must be a positive odd integer"),
    ("perceptual", "lpips", "detect.perceptual: 'lpips' is not available"),
    ("perceptual", "vgg", "detect.perceptual: must be one of ssim"),
    ("mask_threshold", 1.5, "detect.mask_threshold: must be a number in [0, 1]"),
    ("mask_threshold", "high", "detect.mask_threshold: must be a number in [0, 1]"),
])
def test_bad_settings_are_refused_naming_the_option(field, value, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        DetectConfig(**{field: value})


def test_inpaint_t_must_be_a_timestep_of_the_model_only_for_autoddpm():
    schedule = ScheduleConfig(num_timesteps=40)
    PipelineConfig(model=model_preset("tiny"), schedule=schedule, detect=DetectConfig(t=20))
    with pytest.raises(ConfigError, match="detect.inpaint_t: must be < T=40, got 50"):
        PipelineConfig(model=model_preset("tiny"), schedule=schedule, detect=DetectConfig(t=20, sampler="autoddpm"))


def test_settings_round_trip_through_config_json():
    config = PipelineConfig(model=model_preset("tiny"), detect=DetectConfig(**{**AUTO, "mask_threshold": 0.2, "dilation": 5}))
    assert PipelineConfig.from_dict(config.to_dict()) == config


def test_calibration_scores_the_same_weighted_map_that_detect_gives():
    from synomaly import SynomalyPipeline
    from synomaly.calibrate import CalibrationGrid, calibrate

    images, disk = lesion_images(n=4)
    settings = {key: AUTO[key] for key in ("sampler", "chain_steps", "inpaint_t", "resamplings", "min_size")}
    pipe = SynomalyPipeline(HealingModel(), PipelineConfig(model=model_preset("tiny"), detect=DetectConfig(**settings)))
    grid = CalibrationGrid(t=(100,), kernel=(1, 3), threshold=(0.01, 0.05, 0.1), max_stages=(1,))
    unmarked, _ = lesion_images(n=2, value=0.5)  # scored as healthy: their masks are empty
    masks = torch.cat([disk, torch.zeros_like(disk[:2])])
    result = calibrate(pipe, torch.cat([images, unmarked]), masks, grid=grid, batch_size=4, progress=False)
    for row in result.table:
        out = pipe.detect(images, torch.Generator().manual_seed(0), t=100, max_stages=1, kernel=row["kernel"], threshold=row["threshold"])
        dice = 2 * (out.mask & disk).flatten(1).sum(1) / (out.mask.flatten(1).sum(1) + disk.flatten(1).sum(1))
        assert row["dice"] == pytest.approx(float(dice.mean()), abs=1e-6)
    assert result.score > 0.5
    healthy = pipe.detect(unmarked, torch.Generator().manual_seed(0), t=100, max_stages=1, kernel=result.detect["kernel"])
    assert result.healthy_percentile_threshold == pytest.approx(np.percentile(healthy.anomaly_map.numpy(), 99), abs=1e-6)


def test_cli_detect_runs_the_sampler_and_refuses_lpips(random_pipeline, tmp_path, capsys):
    from PIL import Image

    from synomaly.cli import main

    model = random_pipeline.save_pretrained(tmp_path / "model")
    image = tmp_path / "scan.png"
    Image.fromarray((np.random.default_rng(0).random((32, 32)) * 255).astype(np.uint8)).save(image)
    common = ["detect", str(image), "-m", str(model), "--sampler", "autoddpm", "--t", "100", "--chain_steps", "2",
              "--inpaint_t", "3", "--resamplings", "2"]
    assert main([*common, "-o", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "summary.json").exists()
    assert main([*common, "-o", str(tmp_path / "refused"), "--perceptual", "lpips"]) == 2
    assert "detect.perceptual: 'lpips' is not available" in capsys.readouterr().err


def run_auto(images, model=None, **overrides):
    model = model or Recorder()
    config = DetectConfig(**{**AUTO, **overrides})
    return multistage_detect(model, SCHED, images, config, gaussian, torch.Generator().manual_seed(0)), model
