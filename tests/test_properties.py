"""Property-based tests (hypothesis) of invariants that must hold for any input."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from synomaly.config import DetectConfig
from synomaly.detect import multistage_detect, stage_mask
from synomaly.maps import difference_map
from synomaly.metrics import confusion_counts, dice, iou
from synomaly.noise import make_noise, noise_names
from synomaly.schedule import DiffusionSchedule

SIDES = st.sampled_from([8, 16, 24, 32])
SCHEDULE = DiffusionSchedule("cosine", 1000)
FAST = settings(max_examples=40, deadline=None)


@st.composite
def mask_pairs(draw):
    b, h, w = draw(st.integers(1, 3)), draw(SIDES), draw(SIDES)
    shape = (b, 1, h, w)
    pred = draw(arrays(np.bool_, shape))
    target = draw(arrays(np.bool_, shape))
    return torch.from_numpy(pred), torch.from_numpy(target)


@FAST
@given(mask_pairs())
def test_dice_and_iou_lie_in_0_1_and_are_symmetric(pair):
    pred, target = pair
    forward, backward = dice(confusion_counts(pred, target)), dice(confusion_counts(target, pred))
    assert torch.equal(forward, backward)
    assert ((forward >= 0) & (forward <= 1)).all()
    overlap = iou(confusion_counts(pred, target))
    assert ((overlap >= 0) & (overlap <= forward + 1e-12)).all()  # IoU never exceeds Dice
    both_empty = ~pred.flatten(1).any(1) & ~target.flatten(1).any(1)
    assert (forward[both_empty] == 1).all()


@st.composite
def image_batches(draw):
    b, h, w = draw(st.integers(1, 3)), draw(SIDES), draw(SIDES)
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(b, 1, h, w, generator=g) * 2 - 1
    foreground = torch.rand(b, 1, h, w, generator=g) < draw(st.floats(0.0, 1.0))
    return images, foreground, g


@FAST
@given(image_batches(), st.sampled_from([1, 3, 5, 7]), st.floats(0.0, 1.0), st.integers(0, 6))
def test_masks_stay_inside_the_foreground(batch, kernel, threshold, min_size):
    images, foreground, g = batch
    recon = torch.rand(images.shape, generator=g) * 2 - 1
    config = DetectConfig(kernel=kernel, threshold=threshold, min_size=min_size)
    diff, mask, areas = stage_mask(images, recon, config, foreground)
    assert not (mask & ~foreground).any()
    assert (diff[~foreground] == 0).all()
    assert np.array_equal(areas, mask.flatten(1).sum(1).numpy())


@FAST
@given(image_batches(), st.sampled_from([1, 3, 5, 7, 9, 11]))
def test_map_is_zero_where_input_equals_reconstruction(batch, kernel):
    images, _, _ = batch
    assert (difference_map(images, images.clone(), kernel) == 0).all()
    _, mask, areas = stage_mask(images, images.clone(), DetectConfig(kernel=kernel, threshold=0.0, min_size=0))
    assert not mask.any() and (areas == 0).all()  # the mask is d > 0 even at threshold 0


class _Identityish(torch.nn.Module):
    """Predicts zero noise: the reconstruction is x_t rescaled; enough to exercise the stage loop."""

    def forward(self, x, t):
        return torch.zeros_like(x)


@settings(max_examples=15, deadline=None)
@given(image_batches(), st.integers(1, 4), st.sampled_from(["binary", "continuous"]))
def test_multistage_masks_stay_inside_the_foreground(batch, stages, fusion):
    images, foreground, g = batch
    config = DetectConfig(t=100, max_stages=stages, kernel=3, threshold=0.05, min_size=0, fusion=fusion)
    out = multistage_detect(_Identityish(), SCHEDULE, images, config, make_noise("gaussian"), g, foreground)
    assert not (out.mask & ~foreground).any()
    assert not (out.stage_masks & ~foreground[:, None]).any()
    assert ((out.stages >= 1) & (out.stages <= stages)).all()
    assert torch.equal(out.nfe, out.stages)


@FAST
@given(st.sampled_from(noise_names()), st.integers(1, 3), st.sampled_from([16, 32, 48]), st.sampled_from([16, 32, 64]),
       st.integers(0, 1000))
def test_every_noise_keeps_shape_dtype_and_device_and_is_finite(name, b, h, w, seed):
    images = torch.rand(b, 1, h, w) * 2 - 1
    noise = make_noise(name)(images, generator=torch.Generator().manual_seed(seed))
    assert noise.shape == images.shape and noise.dtype == images.dtype and noise.device == images.device
    assert torch.isfinite(noise).all()
