"""Diffusion schedule: closed forms, q_sample/predict_x0 inversion, losses (analytic models, no UNet)."""

import math

import pytest
import torch

from synomaly.schedule import DiffusionSchedule, cosine_betas, discretized_gaussian_log_likelihood


def cosine_abar(t: float, T: int = 1000, s: float = 0.008) -> float:
    f = lambda u: math.cos((u / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    return f(t) / f(0)


@pytest.mark.parametrize("t", [0, 1, 100, 500, 900])
def test_cosine_alphas_cumprod_matches_closed_form(t):
    # abar_t of the discrete schedule is abar(t + 1) of the continuous formula (beta_t = 1 - abar(t+1)/abar(t)).
    sched = DiffusionSchedule("cosine", 1000)
    assert sched.alphas_cumprod[t].item() == pytest.approx(cosine_abar(t + 1), rel=1e-5)


def test_cosine_betas_are_clipped():
    betas = cosine_betas(1000)
    assert betas.max().item() == pytest.approx(0.999)
    assert (betas > 0).all()


def test_linear_schedule_golden_values():
    sched = DiffusionSchedule("linear", 1000)
    assert sched.betas[0].item() == pytest.approx(1e-4)
    assert sched.betas[-1].item() == pytest.approx(0.02)
    # Golden: abar at t = 999 of the DDPM linear schedule.
    assert sched.alphas_cumprod[-1].item() == pytest.approx(4.036e-5, rel=1e-3)
    short = DiffusionSchedule("linear", 250)
    assert short.betas[-1].item() == pytest.approx(0.08)


def test_unknown_schedule_lists_valid_names():
    with pytest.raises(ValueError, match="cosine, linear"):
        DiffusionSchedule("quadratic")


def test_predict_x0_inverts_q_sample_with_true_noise():
    sched = DiffusionSchedule()
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(6, 1, 8, 8, generator=g) * 1.8 - 0.9
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor([0, 10, 100, 300, 700, 999])
    x_t = sched.q_sample(x0, t, noise)
    torch.testing.assert_close(sched.predict_x0(x_t, t, noise, clamp=False), x0, atol=2e-3, rtol=0)
    # Per-sample timesteps: sample 5 is almost pure noise, sample 0 almost clean.
    assert (x_t[0] - x0[0]).abs().max() < 0.05
    assert torch.corrcoef(torch.stack([x_t[5].flatten(), noise[5].flatten()]))[0, 1] > 0.99


def test_predict_x0_is_clamped_and_zero_eps_scales():
    sched = DiffusionSchedule()
    t = torch.tensor([300, 300])
    x_t = torch.full((2, 1, 4, 4), 0.3)
    out = sched.predict_x0(x_t, t, torch.zeros_like(x_t))
    expected = min(1.0, 0.3 / math.sqrt(sched.alphas_cumprod[300].item()))
    torch.testing.assert_close(out, torch.full_like(out, expected))
    assert sched.predict_x0(x_t * 10, t, torch.zeros_like(x_t)).max() == 1.0


def test_q_sample_golden_sum():
    sched = DiffusionSchedule()
    g = torch.Generator().manual_seed(1234)
    x0 = torch.linspace(-1, 1, 64).reshape(1, 1, 8, 8).repeat(2, 1, 1, 1)
    noise = torch.randn(x0.shape, generator=g)
    x_t = sched.q_sample(x0, torch.tensor([250, 750]), noise)
    expected = sum(
        (math.sqrt(sched.alphas_cumprod[t].item()) * x0[i] + math.sqrt(1 - sched.alphas_cumprod[t].item()) * noise[i]).sum().item()
        for i, t in enumerate([250, 750])
    )
    assert x_t.sum().item() == pytest.approx(expected, abs=1e-4)


def test_mse_loss_is_zero_for_the_oracle_and_hybrid_adds_the_bound():
    sched = DiffusionSchedule()
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 1, 8, 8, generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor([0, 5, 50, 500])
    x_t = sched.q_sample(x0, t, noise)
    assert sched.loss(noise, noise, x0, x_t, t, "mse").item() == 0.0
    # With the true noise the KL terms (t > 0) vanish; only the t = 0 decoder NLL remains.
    terms = sched.vlb_terms(noise, x0, x_t, t)
    assert terms[1:].abs().max() < 1e-4
    assert terms[0] > 0
    wrong = noise + 0.5
    assert sched.loss(wrong, noise, x0, x_t, t, "hybrid") > sched.loss(wrong, noise, x0, x_t, t, "mse")
    with pytest.raises(ValueError, match="mse, hybrid"):
        sched.loss(noise, noise, x0, x_t, t, "l1")


def test_kl_term_matches_gaussian_formula():
    sched = DiffusionSchedule()
    x0 = torch.zeros(1, 1, 2, 2)
    noise = torch.zeros_like(x0)
    t = torch.tensor([100])
    x_t = sched.q_sample(x0, t, noise)
    eps = torch.full_like(x0, 0.1)
    mean_q = sched.q_posterior_mean(x0, x_t, t)
    mean_p = sched.q_posterior_mean(sched.predict_x0(x_t, t, eps, clamp=False), x_t, t)
    var = sched.posterior_log_variance[100].exp()
    expected = (0.5 * (mean_q - mean_p) ** 2 / var).mean() / math.log(2)
    assert sched.vlb_terms(eps, x0, x_t, t).item() == pytest.approx(expected.item(), rel=1e-5)


def test_discretized_likelihood_sums_to_one_over_bins():
    levels = torch.linspace(-1, 1, 256)
    mean = torch.full_like(levels, 0.1)
    log_var = torch.full_like(levels, math.log(0.05**2))
    total = discretized_gaussian_log_likelihood(levels, mean, log_var).exp().sum()
    assert total.item() == pytest.approx(1.0, abs=1e-4)


def test_buffers_follow_the_module_device_and_dtype():
    sched = DiffusionSchedule().to(torch.float64)
    assert sched.alphas_cumprod.dtype == torch.float64
    assert "alphas_cumprod" not in sched.state_dict()
