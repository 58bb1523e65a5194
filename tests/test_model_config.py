"""UNet presets, image-size checks and the config.json contract."""

import json

import pytest
import torch

from synomaly.config import DetectConfig, ModelConfig, PipelineConfig, ScheduleConfig, model_preset
from synomaly.errors import ConfigError
from synomaly.model import build_unet, check_image_size, count_parameters


def test_paper_preset_has_the_reference_parameter_count():
    with torch.device("meta"):
        unet = build_unet(model_preset("paper"))
    assert count_parameters(unet) == 98_619_009


@pytest.mark.parametrize("name, lower, upper", [("small", 1_000_000, 5_000_000), ("tiny", 1_000, 300_000)])
def test_small_presets_sizes(name, lower, upper):
    with torch.device("meta"):
        assert lower < count_parameters(build_unet(model_preset(name))) < upper


def test_tiny_unet_runs_with_per_sample_timesteps():
    unet = build_unet(model_preset("tiny"))
    out = unet(torch.randn(3, 1, 32, 32), torch.tensor([0, 500, 999]))
    assert out.shape == (3, 1, 32, 32)


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ValueError, match="paper, small, tiny"):
        model_preset("huge")


@pytest.mark.parametrize("h, w", [(30, 32), (32, 34), (2, 2)])
def test_image_sizes_the_unet_cannot_take_are_rejected(h, w):
    with pytest.raises(ValueError, match="multiples of 4"):
        check_image_size(model_preset("tiny"), h, w)


def test_valid_non_square_size_is_accepted():
    check_image_size(model_preset("small"), 64, 96)


@pytest.mark.parametrize(
    "kwargs, option",
    [
        ({"channels": (8, 8), "attention_levels": (False,)}, "model.attention_levels"),
        ({"channels": (8, 12, 16), "norm_num_groups": 8}, "model.channels"),
        ({"image_size": 30}, "model.image_size"),
    ],
)
def test_model_config_validation(kwargs, option):
    with pytest.raises(ConfigError, match=option):
        ModelConfig(**kwargs)


@pytest.mark.parametrize(
    "field, value",
    [("t", -1), ("max_stages", 0), ("kernel", 4), ("threshold", 2.5), ("min_size", -1), ("fusion", "mean"), ("connectivity", 3)],
)
def test_detect_config_rejects_out_of_range_values(field, value):
    with pytest.raises(ConfigError, match=f"detect.{field}"):
        DetectConfig(**{field: value})


def test_timestep_beyond_the_schedule_is_rejected():
    with pytest.raises(ConfigError, match="detect.t: must be < T=100"):
        PipelineConfig(schedule=ScheduleConfig(num_timesteps=100), detect=DetectConfig(t=100))


def test_pipeline_config_json_round_trip():
    config = PipelineConfig(model=model_preset("tiny"), noise={"name": "synomaly", "sigma": 1.5, "direction": [1, -1]})
    data = json.loads(json.dumps(config.to_dict()))
    assert PipelineConfig.from_dict(data) == config


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"detect": {"treshold": 0.2}}, "unknown key"),
        ({"detect": {"t": "200"}}, "detect.t: expected an integer"),
        ({"model": {"channels": 8}}, "model.channels: expected a list"),
        ({"model": {"resblock_updown": 1}}, "expected true or false"),
        ({"schedule": []}, "schedule: expected an object"),
    ],
)
def test_bad_config_values_name_the_option(patch, message):
    data = PipelineConfig().to_dict()
    for key, value in patch.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) else value
    with pytest.raises(ConfigError, match=message):
        PipelineConfig.from_dict(data)


def test_sections_in_their_plain_form_and_noises_registered_elsewhere_load():
    from synomaly.preprocess import Preprocessing

    config = PipelineConfig(preprocess={"size": 64, "foreground": "auto"}, noise={"name": "mynoise", "scale": 2})
    assert config.preprocess == Preprocessing(size=64, foreground="auto") and PipelineConfig(preprocess={}).preprocess is None
    with pytest.raises(ConfigError, match="synomaly noise"):  # a registered noise is checked on load
        PipelineConfig(noise={"name": "synomaly", "sigmaa": 2})
    with pytest.raises(ConfigError, match="training: unknown key"):
        PipelineConfig(training={"stepz": 3})
