"""SynomalyPipeline: model folder round trip, settings, input checks, and detection on a trained tiny model."""

import copy
import json
import subprocess
import sys

import pytest
import torch

from synomaly import SynomalyPipeline
from synomaly.config import model_preset
from synomaly.errors import ConfigError, InputError, OutputExistsError
from synomaly.model import build_unet


def test_save_and_load_give_identical_detections(random_pipeline, tmp_path):
    random_pipeline.save_pretrained(tmp_path)
    loaded = SynomalyPipeline.from_pretrained(tmp_path)
    images = torch.rand(3, 1, 32, 32) * 2 - 1
    a = random_pipeline.detect(images, generator=torch.Generator().manual_seed(0), min_size=2)
    b = loaded.detect(images, generator=torch.Generator().manual_seed(0), min_size=2)
    torch.testing.assert_close(a.reconstruction, b.reconstruction)
    torch.testing.assert_close(a.stages, b.stages)
    assert loaded.config.model == random_pipeline.config.model
    assert json.loads((tmp_path / "config.json").read_text())["version"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


def test_save_refuses_to_overwrite(random_pipeline, tmp_path):
    random_pipeline.save_pretrained(tmp_path)
    with pytest.raises(OutputExistsError, match="already exists"):
        random_pipeline.save_pretrained(tmp_path)
    random_pipeline.save_pretrained(tmp_path, overwrite=True)


def test_loading_does_not_import_lightning(random_pipeline, tmp_path):
    random_pipeline.save_pretrained(tmp_path)
    code = (
        "import sys; from synomaly import SynomalyPipeline; import torch;"
        f"p = SynomalyPipeline.from_pretrained({str(tmp_path)!r}); p.detect(torch.zeros(1, 1, 32, 32));"
        "print(sorted(m for m in sys.modules if m.startswith(('lightning', 'pytorch_lightning'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: (d / "config.json").unlink(), "config.json: missing"),
        (lambda d: (d / "config.json").write_text("{not json"), "config.json: not valid JSON"),
        (lambda d: (d / "config.json").write_text('{"detect": {"t": 5000}}'), "detect.t: must be < T=1000"),
        (lambda d: (d / "model.safetensors").write_bytes(b"\x00" * 10), "model.safetensors: not readable"),
        (lambda d: (d / "model.safetensors").unlink(), "model.safetensors: missing"),
        (lambda d: (d / "thresholds.json").write_text('{"detect": {"kernel": 4}}'), "thresholds.json: detect.kernel"),
    ],
)
def test_damaged_model_folders_raise_one_clear_error(random_pipeline, tmp_path, damage, message):
    random_pipeline.save_pretrained(tmp_path)
    damage(tmp_path)
    with pytest.raises(InputError, match=message):
        SynomalyPipeline.from_pretrained(tmp_path)


def test_weights_of_another_architecture_are_rejected(random_pipeline, tmp_path):
    random_pipeline.save_pretrained(tmp_path)
    other = SynomalyPipeline(build_unet(model_preset("tiny", channels=(16, 16, 16))), random_pipeline.config)
    other.save_pretrained(tmp_path / "other")
    (tmp_path / "other" / "model.safetensors").replace(tmp_path / "model.safetensors")
    with pytest.raises(InputError, match="weights do not match config.json"):
        SynomalyPipeline.from_pretrained(tmp_path)


def test_thresholds_json_overrides_detection_defaults(random_pipeline, tmp_path):
    random_pipeline.save_pretrained(tmp_path)
    (tmp_path / "thresholds.json").write_text(json.dumps({"detect": {"threshold": 0.33, "t": 150}}))
    loaded = SynomalyPipeline.from_pretrained(tmp_path)
    assert (loaded.config.detect.threshold, loaded.config.detect.t) == (0.33, 150)


@pytest.mark.parametrize(
    "images, message",
    [
        (torch.zeros(1, 32, 32), r"\[B, 1, H, W\]"),
        (torch.zeros(1, 3, 32, 32), r"\[B, 1, H, W\]"),
        (torch.zeros(1, 1, 32, 32, dtype=torch.uint8), "floating point"),
        (torch.full((1, 1, 32, 32), float("nan")), "NaN"),
        (torch.full((1, 1, 32, 32), 3.0), r"scaled to \[-1, 1\]"),
        (torch.zeros(1, 1, 30, 32), "multiples of 4"),
    ],
)
def test_bad_images_are_rejected(random_pipeline, images, message):
    with pytest.raises(ValueError, match=message):
        random_pipeline.detect(images)


@pytest.mark.parametrize("override, message", [({"t": 1000}, "detect.t"), ({"kernel": 2}, "detect.kernel"), ({"tresh": 1}, "unknown key")])
def test_bad_overrides_are_rejected(random_pipeline, override, message):
    with pytest.raises(ConfigError, match=message):
        random_pipeline.detect(torch.zeros(1, 1, 32, 32), **override)


def test_inference_noise_keeps_training_parameters(random_pipeline):
    import dataclasses

    pipe = SynomalyPipeline(random_pipeline.unet, dataclasses.replace(random_pipeline.config, noise={"name": "simplex", "octaves": 3}))
    assert pipe.inference_noise("simplex").octaves == 3
    assert type(pipe.inference_noise("gaussian")).__name__ == "GaussianNoise"


@pytest.mark.slow
def test_trained_tiny_model_finds_inserted_lesions(tiny_model_dir, phantom_test):
    from sklearn.metrics import average_precision_score

    _, lesioned, masks = phantom_test
    pipe = SynomalyPipeline.from_pretrained(tiny_model_dir)
    one = pipe.detect(lesioned, generator=torch.Generator().manual_seed(0), max_stages=1)
    multi = pipe.detect(lesioned, generator=torch.Generator().manual_seed(0), max_stages=5)
    prevalence = masks.float().mean().item()
    for out in (one, multi):
        ap = average_precision_score(masks.flatten().numpy(), out.anomaly_map.flatten().numpy())
        assert ap > 10 * prevalence, f"AP {ap:.3f} vs prevalence {prevalence:.3f}"
        inter = (out.mask & masks).flatten(1).sum(1)
        dice = (2 * inter / (out.mask.flatten(1).sum(1) + masks.flatten(1).sum(1))).mean().item()
        assert dice > 0.5
    assert one.stages.max() == 1
    assert 2 <= multi.stages.float().mean() <= 5


@pytest.mark.slow
def test_healthy_images_score_lower_than_lesioned(tiny_model_dir, phantom_test):
    from sklearn.metrics import roc_auc_score

    healthy, lesioned, _ = phantom_test
    pipe = SynomalyPipeline.from_pretrained(tiny_model_dir)
    scores = pipe.detect(torch.cat([healthy, lesioned]), generator=torch.Generator().manual_seed(0)).score
    labels = [0] * len(healthy) + [1] * len(lesioned)
    assert roc_auc_score(labels, scores.numpy()) > 0.8


@pytest.mark.parametrize("sampler", ["one-step", "chain"])
def test_bf16_detection_matches_float32(tiny_model_dir, phantom_test, sampler):
    """bf16 autocast covers the network only: maps and masks stay float32 and close to the float32 run."""
    _, lesioned, masks = phantom_test
    runs = [SynomalyPipeline.from_pretrained(tiny_model_dir, bf16=bf16).detect(
        lesioned[:8], generator=torch.Generator().manual_seed(0), max_stages=3, sampler=sampler, chain_steps=3)
        for bf16 in (False, True)]
    assert runs[1].anomaly_map.dtype == runs[1].reconstruction.dtype == torch.float32
    assert (runs[0].reconstruction - runs[1].reconstruction).abs().mean() < 0.02
    agree = (runs[0].mask == runs[1].mask).float().mean()
    assert agree > 0.98


def test_readme_python_example_runs_as_written():
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"## Python\n\n```python\n(.*?)```", readme, re.S).group(1)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - the README's own example
    out, fit = namespace["out"], namespace["fit"]
    assert out.mask.shape == (4, 1, 64, 64) and fit.original_shape == (100, 80)


def test_images_of_another_size_than_the_model_are_refused_with_the_way_out():
    import numpy as np

    pipe = SynomalyPipeline.from_pretrained("demo")
    with pytest.raises(ValueError, match=r"128x128 but this model takes 64x64.*pipe.preprocess"):
        pipe.detect(torch.zeros(1, 1, 128, 128))
    images, foreground, fit = pipe.preprocess(np.full((2, 128, 128), 7.0))
    assert images.shape == foreground.shape == (2, 1, 64, 64)
    restored = pipe.postprocess(pipe.detect(images, foreground=foreground), fit)
    assert {k: v.shape for k, v in restored.items()} == {k: (2, 128, 128) for k in ("mask", "anomaly_map", "reconstruction")}


def _inputs(n: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.rand(n, 1, 32, 32, generator=g) * 2 - 1, torch.randint(0, 1000, (n,), generator=g)


def test_fused_attention_at_inference_matches_the_recorded_explicit_one(tiny_model_dir):
    pipe = SynomalyPipeline.from_pretrained(tiny_model_dir, channels_last=False)
    assert not pipe.config.model.use_flash_attention  # the folder records explicit attention; it is run fused
    explicit = build_unet(pipe.config.model).eval()
    explicit.load_state_dict(pipe.unet.state_dict())
    x, t = _inputs()
    with torch.no_grad():
        reference = explicit(x, t)
        torch.testing.assert_close(pipe.network(x, t), reference, atol=1e-5, rtol=1e-4)
    assert reference.abs().mean() > 0.01  # a trained network: the comparison means something


def test_chunked_channels_last_forward_gives_the_same_detections(tiny_model_dir):
    whole = SynomalyPipeline.from_pretrained(tiny_model_dir, forward_batch=10**6, channels_last=False)
    chunked = SynomalyPipeline.from_pretrained(tiny_model_dir, forward_batch=3, channels_last=True)
    assert SynomalyPipeline.from_pretrained(tiny_model_dir).forward_batch == 8  # the CPU default
    calls = []
    chunked.unet.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    x, _ = _inputs()
    a = whole.detect(x, generator=torch.Generator().manual_seed(0), min_size=2, max_stages=3, tol=0.0)
    b = chunked.detect(x, generator=torch.Generator().manual_seed(0), min_size=2, max_stages=3, tol=0.0)
    assert calls == [3, 3, 1] * 3  # 7 images in chunks of 3, for each of 3 stages
    torch.testing.assert_close(b.reconstruction, a.reconstruction, atol=1e-5, rtol=1e-4)
    assert torch.equal(a.mask, b.mask) and a.mask.any()


def test_compiled_network_compiles_at_most_twice_as_batches_shrink(trained):
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    pipe = SynomalyPipeline(copy.deepcopy(trained.unet), trained.config, compile=True, forward_batch=8, channels_last=False)
    pipe._compile_backend = counter  # counts graphs instead of compiling them (the inductor path is the same call)
    torch._dynamo.reset()
    x, t = _inputs(12)
    with torch.no_grad():
        for n in (12, 9, 6, 5, 3, 2, 1):  # the active batches of a multi-stage run
            torch.testing.assert_close(pipe.network(x[:n], t[:n]), trained.network(x[:n], t[:n]), atol=1e-5, rtol=1e-4)
    assert 1 <= counter.frame_count <= 2
    torch._dynamo.reset()


def test_open_checks_precision_and_device(tiny_model_dir):
    assert SynomalyPipeline.open(tiny_model_dir, "cpu", "bf16").bf16
    with pytest.raises(ConfigError, match="--precision"):
        SynomalyPipeline.open(tiny_model_dir, "cpu", "16")
    with pytest.raises(ConfigError, match="--device"):
        SynomalyPipeline.open(tiny_model_dir, "tpu")
