"""``synomaly detect`` over files: one case folder per input, on the input's grid, and ``summary.json``.

A rerun skips the cases made with the same model and settings, and refuses to mix others into the folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import logging
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

import synomaly
from synomaly import _atomic
from synomaly._json import json_plain, read_json
from synomaly.case_outputs import DEFAULT_FORMATS, check_formats, write_case_outputs
from synomaly.config import DetectConfig
from synomaly.data import load_file, pair_sources
from synomaly.devices import resolve_device, show_progress
from synomaly.errors import ConfigError, InputError, OutputError, OutputExistsError, SynomalyError, readable
from synomaly.input_checks import warn_input
from synomaly.io import geometry_mismatch
from synomaly.methods import Method
from synomaly.pipeline import SynomalyPipeline
from synomaly.preprocess import Preprocessing

if TYPE_CHECKING:
    from synomaly.lesions import MinVolume

log = logging.getLogger("synomaly.commands")


def _batched_detect(pipe: SynomalyPipeline, images: torch.Tensor, foreground: torch.Tensor, batch_size: int,
                    generator: torch.Generator, settings: DetectConfig) -> dict[str, torch.Tensor]:
    """Run ``detect`` over ``images`` in batches; returns the outputs concatenated on the CPU."""
    parts: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(images), batch_size):
        out = pipe.detect(images[start : start + batch_size], generator=generator,
                          foreground=foreground[start : start + batch_size], config=settings)
        for key in ("reconstruction", "anomaly_map", "mask", "stages", "score"):
            parts.setdefault(key, []).append(getattr(out, key).cpu())
    return {key: torch.cat(values) for key, values in parts.items()}


def run_detect(
    model: str | Path,
    inputs: list[str],
    output: str | Path,
    *,
    detect: dict[str, Any] | None = None,
    batch_size: int = 32,
    device: str = "auto",
    precision: str = "32",
    compile: bool = False,
    seed: int = 0,
    slice_axis: int = 2,
    slice_range: tuple[int, int] | None = None,
    on_error: str = "skip",
    foreground_masks: list[str] | None = None,
    min_volume: str | None = None,
    overwrite: bool = False,
    recursive: bool = False,
    formats: str | tuple[str, ...] = DEFAULT_FORMATS,
) -> dict[str, Any]:
    """Detect anomalies in every input; writes per-input outputs and ``summary.json``.

    ``foreground_masks`` (one source per input) replaces the model's computed foreground. Folders
    are searched for images directly inside them, and in their subfolders too when ``recursive``.

    NIfTI and DICOM inputs get NIfTI outputs on their grid. Image and array inputs get ``formats``
    (some of ``synomaly.case_outputs.FORMATS``): ``npy`` with the exact values, ``png`` (one file per slice) or ``tiff``
    (one multi-page file) to look at: the mask as 0/255, the anomaly map as 8-bit with its scale in
    ``case.json`` and the reconstruction on the input's own intensity scale. Each case's ``score``
    is its mask's area per slice at the input's resolution, in mm^2 where the file records its
    spacing and in the input's pixels otherwise (``score_unit``).
    ``min_volume`` (``"10mm3"``, ``"0.05ml"`` or ``"8voxels"``) drops the smaller 3-D lesions of every
    volume (NIfTI, DICOM series) on its own grid, after the per-slice ``min_size`` of the model's
    detection (``min_size=0`` leaves the 3-D rule alone); 2-D images keep their masks as detected.

    Every case records the settings and model it was made with (``made_with`` in ``case.json``).
    Inputs whose outputs exist are skipped unless ``overwrite`` is set, so a killed run completes
    the missing cases when started again; outputs made with other settings or another model stop
    the run before any work, asking for ``overwrite`` or another output folder. Each input draws its
    own noise (seeded by ``seed`` and its output name), so skipping one never changes another.
    A bad input is reported and skipped (``on_error="skip"``) or stops the run (``on_error="stop"``).
    """
    if on_error not in ("skip", "stop"):
        raise ConfigError("on_error", f"must be skip or stop, got {on_error!r}")
    from synomaly.lesions import MinVolume

    smallest = None if min_volume is None else MinVolume.parse(min_volume)
    _atomic.check_writable(output)  # a file, a folder under a file or a read-only place: refused before any work
    formats = check_formats(formats)
    rank, world = process_shard()
    pipe = SynomalyPipeline.open(model, _rank_device(device, world), precision, compile)
    overrides = {k: v for k, v in (detect or {}).items() if v is not None}
    settings = pipe.detect_config(**overrides)
    pre = pipe.preprocessing
    output = Path(output)
    assert pipe.folder is not None  # from_pretrained records the folder it read
    # The model is identified by its files' digest, not its path: a moved or renamed folder is the same model.
    made_with = json_plain({"model_sha256": model_fingerprint(pipe.folder),
                            "detect": dataclasses.asdict(settings), "seed": seed, "precision": precision, "slice_axis": slice_axis,
                            "slice_range": slice_range, "foreground_masks": foreground_masks, "formats": list(formats),
                            # only when given: folders made before the option existed stay valid
                            **({} if smallest is None else {"min_volume": str(smallest)})})
    if foreground_masks is not None and len(foreground_masks) != len(inputs):
        raise InputError(foreground_masks[0] if foreground_masks else "foreground_masks",
                         f"{len(foreground_masks)} foreground mask sources given for {len(inputs)} inputs")
    # One process locks the folder; each process of a sharded run locks its own place in it.
    with _atomic.folder_lock(output if world == 1 else output / f".rank-{rank}-of-{world}", "synomaly detect"):
        if not overwrite:
            _check_earlier_run(output, made_with)
        summary: dict[str, Any] = {"synomaly": synomaly.__version__, "model": str(model),
                                   "detect": dataclasses.asdict(settings), "min_volume": None if smallest is None else str(smallest),
                                   "made_with": made_with, "cases": [], "failed": []}
        mine: list[tuple[tuple[Any, ...], str]] = []
        done = 0
        try:
            jobs = [(spec, source, fg) for i, spec in enumerate(inputs)
                    for source, fg in _expand_or_report(spec, None if foreground_masks is None else foreground_masks[i],
                                                        summary, on_error, recursive)]
            stems = _output_stems([(source, Path(spec)) for spec, source, _ in jobs], output)  # over all inputs: every process agrees
            mine = list(zip(jobs, stems))[rank::world]
            for (_, source, fg), stem in tqdm(mine, desc="detect", unit="input", disable=not show_progress()):
                _detect_one(pipe, pre, source, fg, stem, output, summary, settings, batch_size, made_with,
                            slice_axis, slice_range, on_error, overwrite, smallest)
                done += 1
        except BaseException as error:  # the run stops: summary.json still says what was done and what failed
            summary["stopped"] = readable(str(error)) or type(error).__name__
            failed = {entry["input"] for entry in summary["failed"]}
            summary["not_run"] = [_spec_of(source) for (_, source, _), _ in mine[done:] if _spec_of(source) not in failed]
            with contextlib.suppress(SynomalyError):  # e.g. the disk is full: the first error is the one to show
                _write_summary(output, summary, rank, world)
            raise
        if world > 1:
            summary = _gather_shards(summary, stems, rank, world)
        if rank == 0:
            _write_summary(output, summary)
    if world > 1:
        (output / f".rank-{rank}-of-{world}").rmdir()
    log.info("%d inputs done, %d failed; summary in %s", len(summary["cases"]), len(summary["failed"]), output / "summary.json")
    return summary


def _write_summary(output: Path, summary: dict[str, Any], rank: int = 0, world: int = 1) -> None:
    """Write ``summary.json`` (a process of a sharded run that stops writes its own ``summary.rank-R-of-N.json``)."""
    _atomic.write_json(output / ("summary.json" if world == 1 else f"summary.rank-{rank}-of-{world}.json"), summary)


def process_shard() -> tuple[int, int]:
    """This process's rank and the number of processes, as ``torchrun`` (or any launcher setting ``RANK`` and
    ``WORLD_SIZE``) started it; ``(0, 1)`` for a plain run. Process ``r`` of ``n`` takes inputs ``r, r + n, ...``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world < 1 or not 0 <= rank < world:
        raise ConfigError("RANK", f"RANK={rank} and WORLD_SIZE={world} do not describe a process of a run")
    return rank, world


def _rank_device(device: str, world: int) -> str:
    """Each process of a sharded run on GPUs takes the GPU of its ``LOCAL_RANK``."""
    name = resolve_device(device)
    return f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if world > 1 and name == "cuda" else name


def _gather_shards(summary: dict[str, Any], stems: list[str], rank: int, world: int) -> dict[str, Any]:
    """Every process's summary merged into one, cases in input order (``torch.distributed``, gloo: CPU or GPU)."""
    import datetime

    import torch.distributed as dist

    started = not dist.is_initialized()
    if started:  # the processes wait for the slowest one, so the timeout is long
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(days=7))
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, summary)
    if started:
        dist.destroy_process_group()
    order = {stem: i for i, stem in enumerate(stems)}
    cases = sorted((case for part in parts for case in part["cases"]), key=lambda case: order.get(case["output"], len(order)))
    return {**summary, "cases": cases, "failed": [f for part in parts for f in part["failed"]], "processes": world}


def _output_stems(sources: list[tuple[Any, Path]], output: Path) -> list[str]:
    """One output folder name per input: its file name (with the bundle key), made unique with a digest of the
    input's path when two inputs share it (``a.png`` and ``a.tif``) or an earlier run's case holds it."""
    from synomaly.io import output_stem

    stems: list[str] = []
    owners: dict[str, str] = {}
    for source, root in sources:
        stem = output_stem(source.path, root if root.is_dir() else source.path) + (f"__{source.key}" if source.key else "")
        owner = f"{source.path.resolve()}:{source.key or ''}"
        marker = output / stem / "case.json"
        earlier = read_json(marker) if marker.is_file() else None
        taken = earlier is not None and f"{Path(earlier.get('input', '')).resolve()}:{earlier.get('key') or ''}" != owner
        if owners.setdefault(stem, owner) != owner or taken:  # e.g. a.png and a.tif, or p1/x.png and p1__x.png
            stem = f"{stem}-{hashlib.sha256(owner.encode()).hexdigest()[:8]}"
            owners[stem] = owner
        stems.append(stem)
    return stems


def _spec_of(source: Any) -> str:
    """The input as the user names it: a path, or ``bundle.npz:key``."""
    return f"{source.path}:{source.key}" if source.key else str(source.path)


def model_fingerprint(folder: str | Path) -> str:
    """SHA-256 over a model folder's ``config.json``, ``thresholds.json`` and weights (those present)."""
    digest = hashlib.sha256()
    for name in ("config.json", "thresholds.json", "model.safetensors"):
        path = Path(folder) / name
        if path.is_file():
            digest.update(name.encode())
            with path.open("rb") as f:
                for block in iter(functools.partial(f.read, 1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


def _check_earlier_run(output: Path, made_with: dict[str, Any]) -> None:
    """Refuse (before any work) to add to an output folder whose cases were made with other settings."""
    for marker in sorted(output.glob("*/case.json")):
        earlier = read_json(marker).get("made_with")
        if earlier is None:
            raise OutputExistsError(marker.parent, "made by an earlier synomaly version that recorded no settings; pass "
                                                   "--overwrite to redo every case, or choose another --output")
        if earlier != made_with:
            changed = sorted(k for k in made_with if (earlier or {}).get(k) != made_with[k])
            if "detect" in changed and isinstance(earlier, dict):
                changed.remove("detect")
                changed += [f"detect.{k}" for k, v in made_with["detect"].items() if earlier["detect"].get(k) != v]
            raise OutputExistsError(marker.parent, f"made with other settings or another model ({', '.join(changed) or 'unknown'}); "
                                                   "pass --overwrite to redo every case, or choose another --output")


def _warn_orientation(pipe: SynomalyPipeline, record: Any) -> None:
    """Warn once when a NIfTI volume meets a model folder made before volumes were read in canonical order."""
    if record.properties.format == "nifti" and "nifti_orientation" not in pipe.config.training and not getattr(
            pipe, "_warned_orientation", False):
        pipe._warned_orientation = True  # type: ignore[attr-defined]
        log.warning("%s was made by a synomaly version that read NIfTI volumes in their stored voxel order; volumes "
                    "are now read in canonical LAS order, so slices of RAS-stored volumes appear mirrored to it",
                    pipe.folder or "this model")


def _case_generator(device: torch.device, seed: int, stem: str) -> torch.Generator:
    """The noise of one input: seeded by the run's seed and the input's output name."""
    key = int.from_bytes(hashlib.sha256(f"{seed}:{stem}".encode()).digest()[:8], "little")
    return torch.Generator(device).manual_seed(key)


def _expand_or_report(spec: str, fg_spec: str | None, summary: dict[str, Any], on_error: str,
                      recursive: bool = False) -> list[tuple[Any, ...]]:
    """The files of ``spec``, each with its foreground mask spec; a bad spec is reported (or raised)."""
    try:
        return pair_sources([spec], [fg_spec] if fg_spec is not None else None, recursive=recursive)
    except SynomalyError as error:
        summary["failed"].append({"input": spec, "error": str(error)})
        if on_error == "stop":
            raise
        log.error("%s", error)
        return []


def _detect_one(pipe: SynomalyPipeline, pre: Preprocessing, source: Any, fg_spec: str | None, stem: str, output: Path,
                summary: dict[str, Any], settings: DetectConfig, batch_size: int, made_with: dict[str, Any],
                slice_axis: int, slice_range: tuple[int, int] | None, on_error: str, overwrite: bool,
                min_volume: MinVolume | None = None) -> None:
    case_dir = output / stem
    if case_dir.is_symlink():
        raise InputError(case_dir, "is a symbolic link: outputs are never written through links; remove it or choose "
                                   "another output folder")
    marker = case_dir / "case.json"
    if marker.exists() and not overwrite:
        log.info("%s: outputs exist, skipped (use --overwrite to redo)", source.name)
        summary["cases"].append(read_json(marker))
        return
    created = not case_dir.exists()
    try:
        marker.unlink(missing_ok=True)  # redone with --overwrite: not done until its new outputs are all written
        summary["cases"].append(_detect_case(pipe, pre, source, fg_spec, case_dir, stem, settings, batch_size, made_with,
                                             slice_axis, slice_range, min_volume))
    except BaseException as error:
        if created:  # nothing half-written stays behind: a rerun starts the input afresh
            shutil.rmtree(case_dir, ignore_errors=True)
        if not isinstance(error, Exception) or isinstance(error, OutputError):  # interrupted, disk full, read-only
            raise
        failure = error if isinstance(error, SynomalyError) else InputError(
            _spec_of(source), f"cannot be processed ({type(error).__name__}: {readable(str(error))})")
        summary["failed"].append({"input": _spec_of(source), "error": str(failure)})
        if on_error == "stop":
            if failure is error:
                raise
            raise failure from error
        log.error("%s", failure)
        log.debug("%s", source.name, exc_info=error)


def _detect_case(pipe: SynomalyPipeline, pre: Preprocessing, source: Any, fg_spec: str | None, case_dir: Path, stem: str,
                 settings: DetectConfig, batch_size: int, made_with: dict[str, Any], slice_axis: int,
                 slice_range: tuple[int, int] | None, min_volume: MinVolume | None = None) -> dict[str, Any]:
    """Read, detect and write one input; returns its ``case.json`` entry (written last, marking it done)."""
    marker = case_dir / "case.json"
    record, images, foreground = load_file(source, pre, slice_axis, slice_range, fg_spec)
    _warn_orientation(pipe, record)
    warn_input(_spec_of(source), images, pre, pipe.config.training)
    problem = geometry_mismatch(pipe.config.training, record.properties, record.fit)
    if problem:
        log.warning("%s: %s", source.name, problem)
    start = time.perf_counter()
    generator = _case_generator(pipe.device, made_with["seed"], stem)
    outputs = _batched_detect(pipe, torch.from_numpy(images), torch.from_numpy(foreground), batch_size, generator, settings)
    seconds = time.perf_counter() - start
    fields, area, lesions = write_case_outputs(case_dir, record, images, outputs, settings, pre, tuple(made_with["formats"]),
                                                min_volume)
    spacing = record.properties.spacing
    area_mm2 = (area * spacing[0] * spacing[1]).tolist() if spacing else None
    height, width = record.properties.stack_shape[1:]
    own_score = type(pipe.method).image_score is not Method.image_score  # e.g. f-AnoGAN's combined residual
    entry = {"input": str(source.path), "key": source.key, "output": stem, **fields, "slices": len(images),
             "case_ids": record.case_ids, "area_px": area.tolist(), "area_mm2": area_mm2, "lesions": lesions,
             "score": outputs["score"].tolist() if own_score else area_mm2 if spacing else area.tolist(),
             "score_unit": pipe.method.score_unit(pre.size) if own_score else "mm^2 (flagged area per slice)" if spacing
             else f"pixels of the {width}x{height} input (flagged area per slice)",
             "stages": outputs["stages"].tolist(),
             "seconds": round(seconds, 4), "foreground_mask": fg_spec, "made_with": made_with}
    _atomic.write_json(marker, entry)  # written last: marks the input as done
    return entry
