"""``synomaly`` command: train, detect, calibrate, evaluate, report, demo (thin over ``synomaly.commands``).

Every subcommand takes ``--config file.yaml`` and ``--print-config``. User errors (bad files, bad
options, existing outputs) print one line and exit with status 2; ``--debug`` shows the traceback.

Options are spelt with dashes (``--max-stages``, ``--train.ema-decay``); a config file uses the keys
with underscores (``max_stages``, ``train: {ema_decay: ...}``), as the Python functions name them.
Earlier spellings (``--max_stages``, ``train --model``, ``train --threshold``) still work for one
release and print a one-line deprecation warning.
"""

from __future__ import annotations

import logging
import re
import sys
import typing
from pathlib import Path
from typing import Any

from synomaly.errors import SynomalyError, readable

log = logging.getLogger("synomaly")

AUTODDPM_OPTIONS = ("inpaint_t", "resamplings", "perceptual", "dilation", "mask_threshold")
DETECT_OPTIONS = ("t", "max_stages", "kernel", "threshold", "min_size", "fusion", "sampler", "chain_steps", *AUTODDPM_OPTIONS)
FIXED_OPTIONS = ("min_size", "sampler", "chain_steps", *AUTODDPM_OPTIONS)  # calibrate searches the others
DETECT_HELP = {
    "t": "diffusion timestep each stage noises to, 0..T-1 (larger hides larger lesions, and more anatomy)",
    "max_stages": "most stages (network evaluations) per image; 1 is single-stage",
    "kernel": "odd size of the Gaussian blur before differencing, in pixels at the model's size",
    "threshold": "anomaly-map value (difference on the [-1, 1] image scale) at and above which a pixel is flagged",
    "min_size": "smallest connected component kept, in pixels at the model's size",
    "fusion": "how each stage's mask fuses the reconstruction into the next input: binary or continuous",
    "sampler": "one-step (predict the image from t in one evaluation), chain (AnoDDPM's reverse chain) or autoddpm "
               "(the chain, then AutoDDPM's mask, stitch and re-sample)",
    "chain_steps": "network evaluations of the reverse chain (samplers chain and autoddpm)",
    "inpaint_t": "timestep AutoDDPM's inpainting starts from; it costs inpaint_t x resamplings evaluations (sampler autoddpm)",
    "resamplings": "network evaluations per inpainting timestep, 1 is none (sampler autoddpm)",
    "perceptual": "perceptual map of AutoDDPM's mask: ssim (lpips is refused: no ImageNet network here) (sampler autoddpm)",
    "dilation": "odd side of the square dilating AutoDDPM's mask, in pixels at the model's size; 1 is none (sampler autoddpm)",
    "mask_threshold": "value of AutoDDPM's perceptual-residual map, 0..1, above which a pixel is inpainted; unset: each "
                      "image's 95th percentile (sampler autoddpm)",
}
SOURCES_HELP = ("image sources: files, folders (the images directly inside; subfolders too with --recursive; a folder of "
                ".dcm files is one series) or bundle.npz:key")
MASKS_HELP = "one mask source per image source, in the same order ('none' for healthy inputs)"


def _parser(description: str) -> Any:
    """A subcommand's parser: errors are raised (``main`` prints them as one line), ``--print-config`` spelt with a dash."""
    from jsonargparse import ArgumentParser

    return ArgumentParser(exit_on_error=False, print_config="--print-config", description=description)


def _common(parser: Any, device: bool = True) -> None:
    from jsonargparse import ActionConfigFile

    parser.add_argument("--config", action=ActionConfigFile, help="read options from a YAML or JSON file")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    if device:
        parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:N or mps")
        parser.add_argument("--batch-size", type=int, default=32,
                            help="images per detection batch (the network runs them in chunks that suit the device)")
        parser.add_argument("--seed", type=int, default=0, help="seed of the noise (results are reproducible)")


def _execution(parser: Any) -> None:
    parser.add_argument("--precision", default="32", choices=["32", "bf16"],
                        help="network arithmetic: 32 (float32, exact) or bf16 (bfloat16 autocast: faster on "
                             "GPUs and on CPUs with AMX; masks differ from float32's in about 0.1 percent of pixels)")
    parser.add_argument("--compile", action="store_true", help="run the network through torch.compile (pays off over "
                                                               "many inputs on GPUs, and with bf16 on CPUs; the first batch compiles)")


def _mask_suffix(parser: Any, paired: bool = True) -> None:
    parser.add_argument("--mask-suffix", default=None,
                        help="masks lie beside their images as NAME<suffix>.ext (e.g. _mask for X.png and X_mask.png, as "
                             "Kaggle data sets ship them); those files are not taken as images" if paired else
                             "files NAME<suffix>.ext beside an image NAME.ext are masks, not inputs (e.g. _mask for X.png and "
                             "X_mask.png, as Kaggle data sets ship them)")


def _recursive(parser: Any) -> None:
    parser.add_argument("--recursive", action="store_true",
                        help="search the subfolders of input folders too (default: only the files directly inside)")


def _split_masks(data: list[str], suffix: str, recursive: bool) -> list[tuple[Path, Path, bool]]:
    """Every image file of ``data`` with the mask ``NAME<suffix>.ext`` beside it and whether that mask exists.

    Files named like a mask are left out of the images; one whose image is missing is reported and ignored.
    """
    from synomaly.data import Source, expand
    from synomaly.errors import InputError
    from synomaly.io import suffix_of

    pairs = []
    for spec in data:
        if Source.parse(spec).key is not None:
            raise InputError(spec, "--mask-suffix pairs files on disk; give arrays' masks with --masks bundle.npz:key")
        for source in expand(spec, recursive):
            path = source.path
            ext = suffix_of(path.name)
            stem = path.name[: len(path.name) - len(ext)] if ext else path.name
            if stem.endswith(suffix) and len(stem) > len(suffix):
                image = path.with_name(f"{stem[: -len(suffix)]}{ext}")
                if not image.exists():
                    log.warning("%s: no image %s beside this mask (--mask-suffix %s); ignored", path, image.name, suffix)
                continue
            mask = path.with_name(f"{stem}{suffix}{ext}")
            pairs.append((path, mask, mask.exists()))
    if not pairs:
        raise InputError(data[0], f"only masks (names ending in {suffix}) found, no images")
    return pairs


def masks_beside_images(data: list[str], suffix: str, recursive: bool = False) -> tuple[list[str], list[str]]:
    """Every image of ``data`` (mask files left out) and the mask ``NAME<suffix>.ext`` beside each.

    Raises:
        InputError: A mask is missing (the message names the mask file), or there are only masks.
    """
    from synomaly.errors import InputError

    pairs = _split_masks(data, suffix, recursive)
    for image, mask, exists in pairs:
        if not exists:
            raise InputError(mask, f"does not exist: the mask of {image.name} (--mask-suffix {suffix})")
    return [str(image) for image, _, _ in pairs], [str(mask) for _, mask, _ in pairs]


def _slices(parser: Any) -> None:
    parser.add_argument("--slice-axis", type=int, default=2, help="NIfTI axis to cut 2-D slices along")
    parser.add_argument("--slice-range", type=int, nargs=2, default=None, help="half-open range START STOP of slices")
    parser.add_argument("--foreground-masks", nargs="+", default=None,
                        help="foreground (organ, head) mask per input, paired like --masks (e.g. data.npz:test_headmask); "
                             "replaces the model's computed foreground")


def option(name: str) -> str:
    """The command-line spelling of a setting: ``max_stages`` -> ``--max-stages``, ``grid.max_stages`` -> ``--grid.max-stages``."""
    return "--" + name.replace("_", "-")


def _detect_overrides(parser: Any, names: tuple[str, ...] = DETECT_OPTIONS) -> None:
    from synomaly.config import DetectConfig

    types = typing.get_type_hints(DetectConfig)
    for name in names:
        parser.add_argument(option(name), type=types[name], default=None,
                            help=f"{DETECT_HELP[name]} (default: the model folder's, calibrated or stored)")


def _dataclass_options(parser: Any, cls: type, prefix: str, skip: set[str]) -> None:
    """One ``--prefix.field-name`` option per field of ``cls`` (its docstring's attribute text as help).

    jsonargparse's ``add_class_arguments`` would spell them ``--prefix.field_name``; the values land
    under ``prefix.field_name`` either way, so config files keep the fields' names.
    """
    import dataclasses

    from docstring_parser import parse

    docs = {param.arg_name: " ".join((param.description or "").replace("``", "").split()) for param in parse(cls.__doc__ or "").params}
    types = typing.get_type_hints(cls)
    group = parser.add_argument_group((cls.__doc__ or prefix).splitlines()[0])
    for field in dataclasses.fields(cls):
        if field.name not in skip:
            group.add_argument(option(f"{prefix}.{field.name}"), type=types[field.name], default=field.default,
                               help=docs.get(field.name, ""))


def _train_parser() -> Any:
    from synomaly.commands import preset_names
    from synomaly.config import MODEL_PRESETS
    from synomaly.train import TrainConfig

    p = _parser("Train a diffusion model on healthy images (Synomaly noise by default).")
    p.add_argument("data", nargs="+", help=f"healthy {SOURCES_HELP}")
    p.add_argument("--output", "-o", required=True, help="model folder to write")
    from synomaly.methods import METHODS

    p.add_argument("--method", default="diffusion", choices=list(METHODS),
                   help="; ".join(f"{name}: {m.description}" for name, m in METHODS.items()))
    p.add_argument("--masks", nargs="+", default=None, help=f"{MASKS_HELP} (--method supervised only)")
    _mask_suffix(p)
    _recursive(p)
    p.add_argument("--foreground", default=None, choices=["none", "auto", "disk", "given"],
                   help="region of the blobs in training and of the anomaly map at inference (default: the preset's); "
                        "given: from --foreground-masks, which every later command then needs")
    p.add_argument("--foreground-erosion", type=int, default=None, help="erode the foreground by this many pixels (model size)")
    p.add_argument("--preset", default="brain-flair", choices=preset_names(), help="modality preset (noise settings, foreground)")
    p.add_argument("--network", default=None, choices=list(MODEL_PRESETS),
                   help="network size preset: paper (the paper's UNet), small or tiny; the VAE is sized by it too (default: small)")
    p.add_argument("--model", default=None, help="deprecated spelling of --network (--model names the model folder elsewhere)")
    p.add_argument("--image-size", type=int, default=None, help="square model input size (default: the network preset's)")
    p.add_argument("--noise", default=None, help="training noise: synomaly, gaussian, simplex, coarse, pyramid")
    p.add_argument("--sigma", type=float, default=None, help="Synomaly blob size in pixels (default: preset, scaled to the size)")
    p.add_argument("--blob-threshold", type=float, default=None, help="Synomaly blob threshold on the 0..255 scale")
    p.add_argument("--threshold", type=float, default=None, help="deprecated spelling of --blob-threshold")
    p.add_argument("--offset", type=float, default=None, help="Synomaly intensity offset")
    p.add_argument("--direction", type=int, nargs="+", default=None, help="Synomaly shift direction(s): 1, -1 or both")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (several GPUs: --train.devices)")
    p.add_argument("--batch-size", type=int, default=8, help="images per step and device")
    p.add_argument("--seed", type=int, default=0, help="seed of data order, noise and initial weights")
    _dataclass_options(p, TrainConfig, "train", skip={"batch_size", "seed", "accelerator"})
    _slices(p)
    _common(p, device=False)
    return p


def _detect_parser() -> Any:
    p = _parser("Detect anomalies: reconstruction, anomaly map and mask per input, and summary.json.")
    p.add_argument("inputs", nargs="+", help=SOURCES_HELP)
    p.add_argument("--model", "-m", required=True, help="model folder")
    p.add_argument("--output", "-o", required=True, help="output folder")
    p.add_argument("--on-error", default="skip", choices=["skip", "stop"], help="skip a bad input (and report it) or stop")
    p.add_argument("--format", type=list[str] | str, default="png,npy",
                   help="what to write for each output of an image or array input (PNG, JPEG, TIFF, npy, npz): png (one "
                        "picture per slice), tiff (one multi-page picture) and/or npy (the exact values), comma-separated; "
                        "NIfTI and DICOM inputs get NIfTI volumes on their grid")
    _mask_suffix(p, paired=False)
    _recursive(p)
    _detect_overrides(p)
    p.add_argument("--min-volume", default=None,
                   help="smallest 3-D lesion a volume (NIfTI, DICOM series) keeps, with its unit: 10mm3, 0.05ml or 8voxels, "
                        "on the input's grid across slices; applied after --min_size (0 leaves only this rule)")
    _slices(p)
    _common(p)
    _execution(p)
    return p


def _calibrate_parser() -> Any:
    from synomaly.calibrate import SELECTIONS, CalibrationGrid

    p = _parser("Choose t, kernel, threshold and stages on validation data; writes thresholds.json.")
    p.add_argument("data", nargs="+", help=f"validation {SOURCES_HELP}")
    p.add_argument("--model", "-m", required=True, help="model folder (thresholds.json is written into it)")
    p.add_argument("--masks", nargs="+", default=None, help=f"{MASKS_HELP}; without masks the threshold is a percentile of healthy maps")
    _mask_suffix(p)
    _recursive(p)
    p.add_argument("--percentile", type=float, default=99.0, help="percentile of healthy anomaly-map values (unsupervised rule)")
    p.add_argument("--selection", choices=SELECTIONS, default="fewer-stages",
                   help="how the grid point is chosen: fewer-stages (the fewest stages whose validation Dice is within one "
                        "standard error of the best; default) or best (the highest validation Dice)")
    defaults = CalibrationGrid()
    for name, kind in GRID_TYPES.items():
        p.add_argument(option(f"grid.{name}"), type=list[kind] | kind | str,  # type: ignore[valid-type]  # built per field
                       default=list(getattr(defaults, name)),
                       help=f"candidate {name} values: one value, a comma-separated list or a [list] (default: "
                            f"{','.join(str(v) for v in getattr(defaults, name))})")
    _detect_overrides(p, FIXED_OPTIONS)
    _slices(p)
    _common(p)
    _execution(p)
    return p


def _evaluate_parser() -> Any:
    p = _parser("Evaluate against masks: per-case and aggregate metrics (JSON, CSV).")
    p.add_argument("data", nargs="+", help=SOURCES_HELP)
    p.add_argument("--masks", nargs="+", default=None, help=f"{MASKS_HELP} (or --mask-suffix)")
    _mask_suffix(p)
    _recursive(p)
    p.add_argument("--model", "-m", required=True, help="model folder")
    p.add_argument("--output", "-o", required=True, help="evaluation folder")
    _detect_overrides(p)
    _slices(p)
    _common(p)
    _execution(p)
    return p


def _report_parser() -> Any:
    p = _parser("Write a self-contained HTML report of an evaluation folder.")
    p.add_argument("evaluation", help="folder written by 'synomaly evaluate'")
    p.add_argument("--output", "-o", default=None, help="HTML file (default: EVALUATION/report.html)")
    p.add_argument("--title", default="Synomaly report")
    p.add_argument("--notes", default=None, help="a paragraph shown at the top")
    _common(p, device=False)
    return p


def _score_parser() -> Any:
    p = _parser("Score a detect output folder against reference masks, without running a model.")
    p.add_argument("predictions", help="a synomaly detect output folder (summary.json and one folder per input)")
    p.add_argument("--references", "-r", nargs="+", required=True,
                   help="one folder of masks named like the inputs, or one mask source per input in the order of "
                        "summary.json ('none' for a healthy input, data.npz:key for arrays)")
    p.add_argument("--output", "-o", required=True, help="folder for metrics.json, per_case.csv and per_volume.csv")
    _common(p, device=False)
    return p


def _demo_parser() -> Any:
    p = _parser("Run the whole method on the MNI152 brain template with synthetic lesions; ends with an HTML report.")
    p.add_argument("--output", "-o", default="synomaly-demo", help="demo folder")
    p.add_argument("--train-steps", type=int, default=0, help="train the demo model from scratch for this many steps (0: use the shipped model)")
    _common(p)
    return p


def build_parser() -> Any:
    """The ``synomaly`` argument parser with its subcommands."""
    from jsonargparse import ArgumentParser

    import synomaly

    parser: Any = ArgumentParser(prog="synomaly", exit_on_error=False,
                                 description="Unsupervised anomaly detection with Synomaly noise and multi-stage diffusion.")
    parser.add_argument("--version", action="version", version=f"synomaly {synomaly.__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subcommands(dest="command")
    parser.subcommand_parsers = {}
    for name, build, text in (
        ("train", _train_parser, "train a model on healthy images"),
        ("detect", _detect_parser, "detect anomalies with a trained model"),
        ("calibrate", _calibrate_parser, "choose detection settings on validation data"),
        ("evaluate", _evaluate_parser, "evaluate detections against masks"),
        ("score", _score_parser, "score existing predictions (a detect output folder) against masks"),
        ("report", _report_parser, "HTML report of an evaluation"),
        ("demo", _demo_parser, "the whole method on a built-in brain template, offline"),
    ):
        parser.subcommand_parsers[name] = build()
        parser.subcommand_parsers[name].add_argument("--quiet", action="store_true",
                                                     help="only warnings and errors (also before the command)")
        sub.add_subcommand(name, parser.subcommand_parsers[name], help=text)
    return parser


GRID_TYPES = {"t": int, "kernel": int, "threshold": float, "max_stages": int, "fusion": str}


def grid_values(value: Any, kind: type, name: str) -> list[Any]:
    """A calibration grid axis from ``200``, ``"100,200"``, ``[100, 200]`` or a YAML list."""
    from synomaly.errors import ConfigError

    items = value.split(",") if isinstance(value, str) else value if isinstance(value, (list, tuple)) else [value]
    try:
        out = [kind(item.strip()) if isinstance(item, str) else kind(item) for item in items if str(item).strip()]
    except (TypeError, ValueError):
        raise ConfigError(f"grid.{name}", f"expected {kind.__name__} values (one, a comma-separated list or a list), "
                                          f"got {value!r}") from None
    if kind is int and any(isinstance(item, float) and not float(item).is_integer() for item in items):
        raise ConfigError(f"grid.{name}", f"expected whole numbers, got {value!r}")
    return out


# Options that take several values; a YAML scalar (``inputs: scan.png``) is one value, never its characters.
LIST_OPTIONS = ("inputs", "data", "masks", "foreground_masks", "direction", "slice_range", "references")


def as_list(value: Any, name: str) -> list[Any]:
    """``value`` as a list: a single string or number is one item (not split into characters)."""
    from synomaly.errors import ConfigError

    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return [value]
    if isinstance(value, (list, tuple)):
        return list(value)
    raise ConfigError(f"--{name.replace('_', '-')}", f"expected a value or a list of values, got {value!r}")


def _run(command: str, a: Any) -> Any:
    from synomaly import commands, limits
    from synomaly.errors import ConfigError

    for name in LIST_OPTIONS:
        if a.get(name) is not None:
            a[name] = as_list(a[name], name)
    recursive = bool(a.get("recursive"))
    if a.get("mask_suffix") and command == "detect":
        a.inputs = [str(image) for image, _, _ in _split_masks(a.inputs, a.mask_suffix, recursive)]
    elif a.get("mask_suffix"):
        if a.get("masks") is not None:
            raise ConfigError("--mask-suffix", "give either --masks or --mask-suffix, not both")
        a.data, a.masks = masks_beside_images(a.data, a.mask_suffix, recursive)
    elif command == "evaluate" and a.get("masks") is None:
        raise ConfigError("--masks", "evaluation needs masks: --masks (one source per input, 'none' for healthy ones) "
                                     "or --mask-suffix")
    if a.get("batch_size") is not None and a.batch_size < 1:
        raise ConfigError("--batch-size", f"must be >= 1, got {a.batch_size}")
    if a.get("batch_size") is not None and a.batch_size > limits.MAX_BATCH_SIZE:
        raise ConfigError("--batch-size", f"must be <= {limits.MAX_BATCH_SIZE} (the limit), got {a.batch_size}")
    if a.get("seed") is not None and not 0 <= a.seed <= limits.MAX_SEED:
        raise ConfigError("--seed", f"must be in [0, {limits.MAX_SEED}], got {a.seed}")
    if a.get("train_steps") is not None and not 0 <= a.train_steps <= limits.MAX_STEPS:
        raise ConfigError("--train-steps", f"must be in [0, {limits.MAX_STEPS}], got {a.train_steps}")
    if command != "train" and a.get("device") is not None:
        commands.resolve_device(a.device)  # checked before any data is read
    detect = {name: a.get(name) for name in DETECT_OPTIONS if name in a}
    execution = {"precision": a.get("precision", "32"), "compile": bool(a.get("compile"))}
    slices = {"slice_axis": a.get("slice_axis", 2), "slice_range": tuple(a.slice_range) if a.get("slice_range") else None,
              "foreground_masks": a.get("foreground_masks")}
    if command == "train":
        return _run_train(a, slices)
    if command == "detect":
        return commands.run_detect(a.model, a.inputs, a.output, detect=detect, batch_size=a.batch_size, device=a.device,
                                   seed=a.seed, on_error=a.on_error, min_volume=a.min_volume, overwrite=a.overwrite,
                                   recursive=recursive, formats=a.format, **execution, **slices)
    if command == "calibrate":
        from synomaly.calibrate import CalibrationGrid

        grid = CalibrationGrid(**{k: tuple(grid_values(v, GRID_TYPES[k], k)) for k, v in a.grid.items()})
        return commands.run_calibrate(a.model, a.data, masks=a.masks, grid=grid, detect=detect, percentile=a.percentile,
                                      selection=a.selection, batch_size=a.batch_size, device=a.device, seed=a.seed, overwrite=a.overwrite,
                                      recursive=recursive, **execution, **slices)
    if command == "evaluate":
        return commands.run_evaluate(a.model, a.data, a.masks, a.output, detect=detect, batch_size=a.batch_size,
                                     device=a.device, seed=a.seed, overwrite=a.overwrite, recursive=recursive, **execution,
                                     **slices)
    if command == "score":
        from synomaly.score import score_folder

        return score_folder(a.predictions, a.references, a.output, overwrite=a.overwrite)
    if command == "report":
        return commands.run_report(a.evaluation, a.output, title=a.title, notes=a.notes, overwrite=a.overwrite)
    from synomaly.demo import run_demo

    return run_demo(a.output, train_steps=a.train_steps, device=a.device, batch_size=a.batch_size, seed=a.seed,
                    overwrite=a.overwrite)


def _run_train(a: Any, slices: dict[str, Any]) -> Any:
    from synomaly import commands
    from synomaly.train import TrainConfig

    accelerator = commands.lightning_accelerator(a.device)
    config = TrainConfig(**{**a.train.as_dict(), "batch_size": a.batch_size, "seed": a.seed, "accelerator": accelerator,
                            "progress": a.train.progress and commands.show_progress()})
    blob_threshold = a.blob_threshold
    if a.threshold is not None:
        log.warning("train --threshold is deprecated and will be removed in the next release: use --blob-threshold "
                    "(--threshold of detect, calibrate and evaluate is the anomaly-map threshold)")
        blob_threshold = a.threshold if blob_threshold is None else blob_threshold
    if a.model is not None:
        log.warning("train --model is deprecated and will be removed in the next release: use --network "
                    "(--model of the other commands is the model folder)")
    network = a.network or a.model or "small"
    noise = {"name": a.noise, "sigma": a.sigma, "threshold": blob_threshold, "offset": a.offset,
             "direction": list(a.direction) if a.direction else None}
    preprocess = {k: v for k, v in (("foreground", a.foreground), ("foreground_erosion", a.foreground_erosion))
                  if v is not None}
    return commands.run_train(a.data, a.output, preset=a.preset, model=network, image_size=a.image_size, noise=noise,
                              train_config=config, method=a.method, masks=a.masks, preprocess=preprocess,
                              resume=a.resume, overwrite=a.overwrite, recursive=bool(a.recursive), **slices)


_PARSER_KEY = re.compile(r'^Parser key "([^"]+)"\s*([^:]*):\s*(.*)$')
_EXPECTED = re.compile(r"Expected a <class '(\w+)'>\. Got value: (.*)")
_KINDS = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false"}


def _option_name(parser: Any, key: str, command: str) -> str:
    """How the user spells the option stored under ``key`` (``batch_size`` or ``detect.batch_size`` -> ``--batch-size``)."""
    for dest in (key, key.removeprefix(f"{command}.")):
        for action in getattr(parser, "_actions", []):
            if action.dest == dest:
                return max(action.option_strings, key=len) if action.option_strings else dest
    return f"--{key}"


def _parse_error_line(parser: Any, argv: list[str], error: Exception) -> tuple[str, str]:
    """The subcommand (``""`` when none was recognised) and one line for a command-line parsing error.

    jsonargparse reports some errors over several lines (``Parser key "t":`` then the problem); they
    become ``--t: <problem>``, with a pointer to the command's ``--help``.
    """
    from argparse import ArgumentError

    subparsers = getattr(parser, "subcommand_parsers", {})
    command = next((arg for arg in argv if arg in subparsers), "")
    sub = subparsers.get(command, parser)
    lines = [line.strip().lstrip("- ").strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    first, rest = lines[0], lines[1:]
    key = _PARSER_KEY.match(first)
    if key:
        problem = "; ".join(dict.fromkeys(line for line in [key[3], *rest] if line and not line.startswith("Parser key")))
        expected = _EXPECTED.search(problem)
        if expected:
            problem = f"expected {_KINDS.get(expected[1], expected[1])}, got {expected[2]}"
        element = f" ({key[2]})" if key[2] else ""
        message = f"{_option_name(sub, key[1], command)}{element}: {problem}"
    elif first.startswith("the following arguments are required: "):
        names = first.split(": ", 1)[1].split(", ")
        message = f"{', '.join(_option_name(sub, name, command) for name in names)}: required"
    elif not isinstance(error, ArgumentError):  # raised while a --config file was loaded
        files = [value for option, value in zip(argv, argv[1:]) if option == "--config"]
        message = f"--config {', '.join(files)}: {'; '.join(lines)}" if files else "; ".join(lines)
    else:
        message = "; ".join([first.removeprefix("argument "), *rest])
    where = f"synomaly {command}" if command else "synomaly"
    return command, readable(f"{message.rstrip('.')}; see {where} --help")


def modern_spelling(parser: Any, argv: list[str]) -> tuple[list[str], list[str]]:
    """``argv`` with earlier option spellings replaced (``--max_stages`` -> ``--max-stages``), and a warning for each.

    Only options the subcommand does not know as written are looked at, so values are left alone.
    """
    subparsers = getattr(parser, "subcommand_parsers", {})
    command = next((i for i, arg in enumerate(argv) if arg in subparsers), None)
    if command is None:
        return argv, []
    known = {name for action in subparsers[argv[command]]._actions for name in action.option_strings}
    out, warnings = list(argv), []
    for i, arg in enumerate(argv[command + 1 :], start=command + 1):
        name, equals, value = arg.partition("=")
        modern = name.replace("_", "-")
        if name.startswith("--") and name not in known and modern in known:
            out[i] = modern + equals + value
            warnings.append(f"{name} is deprecated and will be removed in the next release: use {modern}")
    return out, warnings


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``synomaly`` command; returns the exit status."""
    from argparse import ArgumentError

    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    argv, deprecated = modern_spelling(parser, argv)
    try:
        args = parser.parse_args(argv)
    except (ArgumentError, ValueError) as error:  # one line instead of the usage block
        command, line = _parse_error_line(parser, argv, error)
        print(f"synomaly{' ' + command if command else ''}: error: {line}", file=sys.stderr)
        return 2
    quiet = args.quiet or bool(getattr(args.get(args.command), "quiet", False))  # before or after the command
    level = logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(message)s")
    # Lightning has its own console handler: keep its messages single and at the chosen level.
    lightning_log = logging.getLogger("lightning.pytorch")
    lightning_log.propagate = False
    lightning_log.setLevel(level)
    for line in deprecated:
        log.warning("%s", line)
    command = args.command
    try:
        result = _run(command, args[command])
    except (SynomalyError, ValueError, FileNotFoundError, PermissionError, IsADirectoryError) as error:
        if args.debug:
            raise
        print(f"synomaly {command}: error: {readable(str(error))}", file=sys.stderr)
        return getattr(error, "exit_code", 2)
    except KeyboardInterrupt:
        print(f"synomaly {command}: interrupted", file=sys.stderr)
        return 130
    failed = result.get("failed") if isinstance(result, dict) else None
    if failed:
        names = "; ".join(f["error"] for f in failed)
        print(f"synomaly {command}: {len(failed)} input(s) skipped ({names}); see summary.json", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
