"""Multi-stage detection with closed-form epsilon-models (no UNet): masks, fusion, per-image stop."""

import pytest
import torch
from torch import nn

from synomaly.config import DetectConfig
from synomaly.detect import chain_reconstruction, chain_timesteps, multistage_detect, one_step_reconstruction, reconstruct
from synomaly.schedule import DiffusionSchedule

SCHED = DiffusionSchedule()


def gaussian(reference, generator=None):
    return torch.randn(reference.shape, generator=generator, device=reference.device, dtype=reference.dtype)


class HealingModel(nn.Module):
    """Returns the epsilon whose one-step estimate is ``clamp(x_t / sqrt(abar_t), max=ceiling)``:
    it "heals" anything brighter than ``ceiling``. Records the batch size and input of every call."""

    def __init__(self, ceiling: float = 0.2, grow_marked: bool = False):
        super().__init__()
        self.ceiling, self.grow_marked = ceiling, grow_marked
        self.batch_sizes, self.inputs = [], []

    def target(self, x):
        healed = x.clamp(max=self.ceiling)
        if self.grow_marked:  # images marked at pixel (0, 0) get a darker square that grows every call
            side = 4 + 4 * len(self.batch_sizes)
            c, h = x.shape[-1] // 2, side // 2
            marked = (x[:, :, :1, :1] > 0.5).float()
            healed = healed.clone()
            healed[..., c - h : c + h, c - h : c + h] -= 0.6 * marked
        return healed

    def forward(self, x_t, t):
        a = SCHED.sqrt_alphas_cumprod[t].reshape(-1, 1, 1, 1)
        b = SCHED.sqrt_one_minus_alphas_cumprod[t].reshape(-1, 1, 1, 1)
        self.batch_sizes.append(x_t.shape[0])
        self.inputs.append(x_t / a)
        return (x_t - a * self.target(x_t / a)) / b


def lesion_images(n=2, size=32, radius=5, value=0.9):
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    disk = ((yy - size // 2) ** 2 + (xx - size // 2) ** 2) <= radius**2
    images = torch.full((n, 1, size, size), -0.2)
    images[:, 0][:, disk] = value
    return images, disk.expand(n, 1, size, size)


def run(images, model=None, generator=None, foreground=None, **kw):
    config = DetectConfig(**{"t": 0, "kernel": 3, "threshold": 0.1, "min_size": 4, **kw})
    model = model or HealingModel()
    g = generator or torch.Generator().manual_seed(0)
    return multistage_detect(model, SCHED, images, config, gaussian, g, foreground), model


def dice(a, b):
    return (2 * (a & b).sum() / (a.sum() + b.sum())).item()


def test_single_stage_finds_the_bright_lesion():
    images, truth = lesion_images()
    out, model = run(images, max_stages=1)
    assert model.batch_sizes == [2]
    assert out.stages.tolist() == [1, 1] and not out.converged.any()
    assert dice(out.mask, truth) > 0.85
    assert out.reconstruction.max() <= 0.2 + 1e-3  # the lesion was healed
    assert out.score.tolist() == out.mask.flatten(1).sum(1).float().tolist()
    assert out.stage_reconstructions.shape == (2, 1, 1, 32, 32)


def test_multistage_converges_at_stage_two_and_fuses_the_masked_region():
    images, truth = lesion_images()
    out, model = run(images)
    assert model.batch_sizes == [2, 2]
    assert out.stages.tolist() == [2, 2] and out.converged.all()
    # Binary fusion: stage 2 input = reconstruction inside the mask, original outside.
    stage1 = out.stage_reconstructions[:, 0]
    m = out.stage_masks[:, 0]
    expected = torch.where(m, stage1, images)
    torch.testing.assert_close(model.inputs[1], expected, atol=0.05, rtol=0)
    assert dice(out.mask, truth) > 0.85


def test_continuous_fusion_uses_the_thresholded_difference():
    images, _ = lesion_images(n=1)
    out, model = run(images, fusion="continuous", max_stages=2)
    from synomaly.maps import difference_map

    stage1 = out.stage_reconstructions[:, 0]
    w = difference_map(images, stage1, 3) * out.stage_masks[:, 0]
    assert w.max() > 0.5  # extrapolating weights, not a 0/1 mask
    torch.testing.assert_close(model.inputs[1], w * stage1 + (1 - w) * images, atol=0.05, rtol=0)


def test_images_stop_individually_and_cost_no_further_evaluations():
    images, _ = lesion_images(n=3, size=48)
    images[1, :, 0, 0] = 0.9  # marked: its mask grows at every call and never converges
    out, model = run(images, model=HealingModel(grow_marked=True), max_stages=5)
    assert model.batch_sizes == [3, 3, 1, 1, 1]
    assert out.stages.tolist() == [2, 5, 2]
    assert out.converged.tolist() == [True, False, True]
    assert out.stage_masks.shape[1] == 5
    # A stopped image's later stage entries repeat its final result.
    torch.testing.assert_close(out.stage_masks[0, 4], out.mask[0])
    assert out.stage_masks[1, 4].sum() > out.stage_masks[1, 1].sum()


def test_healthy_image_gives_an_empty_mask():
    images = torch.full((2, 1, 32, 32), -0.2)
    out, model = run(images)
    assert not out.mask.any() and out.score.sum() == 0
    assert out.stages.tolist() == [2, 2]
    assert out.anomaly_map.max() < 0.1


def test_min_size_removes_small_lesions():
    images, _ = lesion_images(n=1, radius=1)  # 5 pixels before blurring
    assert run(images, min_size=30, max_stages=1)[0].mask.sum() == 0
    assert run(images, min_size=2, max_stages=1)[0].mask.sum() > 0


def test_nothing_is_flagged_outside_the_foreground():
    images, truth = lesion_images(n=1)
    foreground = torch.zeros_like(truth)
    foreground[..., :, :16] = True  # left half only
    out, _ = run(images, foreground=foreground)
    assert out.mask.any()
    assert not (out.mask & ~foreground).any()
    assert out.anomaly_map[~foreground].abs().max() == 0


def test_same_generator_seed_gives_identical_results():
    images, _ = lesion_images()
    a, _ = run(images, t=300, generator=torch.Generator().manual_seed(7))
    b, _ = run(images, t=300, generator=torch.Generator().manual_seed(7))
    c, _ = run(images, t=300, generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(a.reconstruction, b.reconstruction)
    assert not torch.equal(a.reconstruction, c.reconstruction)


def test_golden_mask_area():
    images, _ = lesion_images(n=1, radius=5)
    out, _ = run(images, max_stages=1, kernel=5, threshold=0.25)
    # The healed difference is 0.7 on the disk; cv2.GaussianBlur(0.7 * disk, (5, 5), 0) >= 0.25 holds on
    # 89 pixels (the closest pixel is 0.018 from the threshold, far above the t = 0 noise) and sums to 56.7.
    assert out.mask.sum().item() == 89
    # Outside the disk the map holds only the blurred t = 0 noise (std 0.006 per pixel).
    assert out.anomaly_map.sum().item() == pytest.approx(56.7 + 1.0, abs=1.5)


# --- baselines: AnoDDPM's reverse chain, the denoising autoencoder, the supervised upper bound ---

def zeros(reference, generator=None):
    return torch.zeros_like(reference)


@pytest.mark.parametrize("t, steps, expected", [(200, 5, [200, 150, 100, 50, 0]), (3, 10, [3, 2, 1, 0]), (250, 1, [250]),
                                                (0, 4, [0])])
def test_chain_timesteps_run_evenly_from_t_down_to_zero(t, steps, expected):
    assert chain_timesteps(t, steps) == expected


def test_chain_of_one_step_is_the_one_step_reconstruction():
    images, _ = lesion_images()
    model = HealingModel()
    one = one_step_reconstruction(model, SCHED, images, 250, gaussian, torch.Generator().manual_seed(3))
    chain = chain_reconstruction(model, SCHED, images, 250, 1, gaussian, torch.Generator().manual_seed(3))
    assert torch.equal(one, chain)


@pytest.mark.parametrize("steps", [2, 5, 26])
def test_noise_free_chain_with_a_healing_model_removes_exactly_the_lesion(steps):
    images, disk = lesion_images()
    out = chain_reconstruction(HealingModel(ceiling=0.2), SCHED, images, 250, steps, zeros)
    assert torch.allclose(out, images.clamp(max=0.2), atol=1e-4)


def test_chain_sampler_counts_its_network_evaluations():
    images, _ = lesion_images()
    model = HealingModel()
    out, _ = run(images, model, t=100, sampler="chain", chain_steps=4, max_stages=1)
    assert out.stages.tolist() == [1, 1] and out.nfe.tolist() == [4, 4] and len(model.batch_sizes) == 4


class ConstantNet(nn.Module):
    """``net(x, t)`` = ``x`` (a perfect autoencoder) or fixed logits (a segmentation net)."""

    def __init__(self, logits=None):
        super().__init__()
        self.logits = logits

    def forward(self, x, t):
        assert (t == 0).all()
        return x if self.logits is None else self.logits.expand_as(x)


def test_dae_reconstruction_is_one_forward_of_the_clean_input():
    images, _ = lesion_images()
    recon, weight, cost = reconstruct(ConstantNet(), SCHED, images, DetectConfig(t=0), gaussian, method="dae")
    assert cost == 1 and weight is None and torch.equal(recon, images)


def test_supervised_map_is_the_blurred_lesion_probability():
    images, disk = lesion_images()
    logits = torch.where(disk[:1], 20.0, -20.0).float()
    model = ConstantNet(logits)
    config = DetectConfig(t=0, max_stages=1, kernel=1, threshold=0.5, min_size=0)
    out = multistage_detect(model, SCHED, images, config, gaussian, foreground=None, method="supervised")
    assert torch.equal(out.mask, disk)
    assert torch.allclose(out.anomaly_map, torch.sigmoid(logits).expand_as(images), atol=1e-6)
