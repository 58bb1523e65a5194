"""UNet presets, image-size checks and the config.json contract."""

import json

import pytest
import torch

from synomaly import limits
from synomaly.config import DetectConfig, ModelConfig, PipelineConfig, ScheduleConfig, TrainConfig, model_preset
from synomaly.errors import ConfigError
from synomaly.methods import check_network_size
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


# --- resource limits ---------------------------------------------------------------------------

TINY = {"channels": (8, 8, 8), "attention_levels": (False, False, True), "num_head_channels": 8, "norm_num_groups": 8,
        "image_size": 32}
LIMITED = [  # (config class, base fields, field, the largest value accepted, option named when it is exceeded)
    (ModelConfig, TINY, "num_res_blocks", limits.MAX_RES_BLOCKS, "model.num_res_blocks"),
    (ModelConfig, TINY, "num_head_channels", limits.MAX_CHANNELS, "model.num_head_channels"),
    (ModelConfig, TINY, "image_size", limits.MAX_IMAGE_SIZE, "model.image_size"),
    (ScheduleConfig, {}, "num_timesteps", limits.MAX_TIMESTEPS, "schedule.num_timesteps"),
    (DetectConfig, {}, "t", limits.MAX_TIMESTEPS - 1, "detect.t"),
    (DetectConfig, {}, "max_stages", limits.MAX_STAGES, "detect.max_stages"),
    (DetectConfig, {}, "kernel", limits.MAX_KERNEL, "detect.kernel"),
    (DetectConfig, {}, "chain_steps", limits.MAX_CHAIN_STEPS, "detect.chain_steps"),
    (DetectConfig, {}, "min_size", limits.MAX_AREA, "detect.min_size"),
    (DetectConfig, {}, "min_area", limits.MAX_AREA, "detect.min_area"),
    (TrainConfig, {}, "steps", limits.MAX_STEPS, "train.steps"),
    (TrainConfig, {}, "batch_size", limits.MAX_BATCH_SIZE, "train.batch_size"),
    (TrainConfig, {}, "num_workers", limits.MAX_WORKERS, "train.num_workers"),
    (TrainConfig, {}, "devices", limits.MAX_DEVICES, "train.devices"),
    (TrainConfig, {}, "num_nodes", limits.MAX_DEVICES, "train.num_nodes"),
    (TrainConfig, {}, "seed", limits.MAX_SEED, "train.seed"),
    (TrainConfig, {}, "log_every", limits.MAX_STEPS, "train.log_every"),
]


@pytest.mark.parametrize("cls, base, field, limit, option", LIMITED, ids=[row[4] for row in LIMITED])
def test_every_size_and_count_has_an_upper_bound(cls, base, field, limit, option):
    step = 2 if field == "kernel" else 8 if field == "image_size" else 1  # odd kernels, image sizes in multiples of 8
    cls(**{**base, field: limit})
    with pytest.raises(ConfigError, match=rf"^{option}: must be (<= {limit} \(the limit\)|< {limit + 1} |in \[0, {limit}\]).*, "
                                          rf"got {limit + step}$"):
        cls(**{**base, field: limit + step})


def test_channels_levels_and_the_parameter_count_are_bounded():
    with pytest.raises(ConfigError, match=f"model.channels: must be <= {limits.MAX_CHANNELS}"):
        ModelConfig(**{**TINY, "channels": (8, 8, 2 * limits.MAX_CHANNELS)})
    with pytest.raises(ConfigError, match=f"model.channels: at most {limits.MAX_LEVELS} levels"):
        ModelConfig(channels=(32,) * 9, attention_levels=(False,) * 9, image_size=256)
    wide = PipelineConfig(model=ModelConfig(**{**TINY, "channels": (2048, 2048, 2048), "attention_levels": (False,) * 3}))
    with pytest.raises(ConfigError, match=r"model: the network would have 1,543,778,305 parameters; at most 1,000,000,000"):
        check_network_size(wide)


def test_the_bounds_keep_the_paper_model_and_large_ct_settings():
    assert check_network_size(PipelineConfig(model=model_preset("paper"))) == 98_619_009
    for method in ("vae", "dae", "intensity"):
        check_network_size(PipelineConfig(model=model_preset("paper"), method=method))
    ModelConfig(**{**TINY, "image_size": 512})
    PipelineConfig(model=model_preset("paper", image_size=512), schedule=ScheduleConfig(num_timesteps=4000),
                   detect=DetectConfig(t=3999, sampler="chain", chain_steps=4000, kernel=31, max_stages=10))
    TrainConfig(steps=1_000_000, batch_size=256, num_workers=32, devices=8, num_nodes=4, seed=2**32 - 1)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("num_workers", -1, "train.num_workers: must be >= 0"),
        ("weight_decay", -1.0, "train.weight_decay: must be a finite number >= 0"),
        ("grad_clip", float("inf"), "train.grad_clip: must be a finite number >= 0"),
        ("lr", float("inf"), "train.lr: must be finite"),
        ("seed", 2**70, "train.seed: must be in \\[0, 4294967295\\]"),
        ("preview_every", -5, "train.preview_every: must be >= 0"),
    ],
)
def test_train_config_names_the_option_of_a_bad_value(field, value, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**{field: value})


def test_a_number_of_many_digits_in_a_message_is_cut_short():
    with pytest.raises(ConfigError) as error:
        DetectConfig(kernel=10**1000 + 1)
    assert str(error.value) == "detect.kernel: must be <= 1023 (the limit), got 100000...(1001 digits)"
