"""Speed of the core operations for one UNet preset on one device (docs/benchmarks.md, "Speed").

Measures, in one run: the network forward time at batch B, ``detect`` time over N images at
batch B with the resulting overhead ``detect / (NFE x forward) - 1``, batched versus
one-image-at-a-time ``detect``, one training step (forward, backward, AdamW) and the Synomaly
noise generation for one training batch. Writes JSON and prints a Markdown table.

``--volume N`` measures instead where the time of a whole volume goes: the network's time per image by
operator kind (torch profiler) at several batch sizes, and ``detect`` over ``N`` slices at ``--stages``
stages (every image runs all of them) for each way of running it, one after the other in rounds so that
a busy machine slows all of them alike.

    python benchmarks/speed.py --preset small --device cpu --batches 1 8 --out benchmarks/results/speed/cpu-small.json
    python benchmarks/speed.py --preset small --device cpu --volume 155 --out benchmarks/results/speed/cpu-small-volume.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from synomaly import SynomalyPipeline
from synomaly.config import PipelineConfig, model_preset
from synomaly.model import build_unet, count_parameters
from synomaly.noise import make_noise
from synomaly.synthetic import healthy_phantoms, insert_lesions


def timed(fn, repeats: int, device: torch.device, warm_up: bool = True) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` runs (the mean of the middle two for an even count), after one
    warm-up run."""
    if warm_up:
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def images_for(n: int, size: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    healthy, head = healthy_phantoms(n, size, g)
    return insert_lesions(healthy, head, g)[0].to(device)


def measure(preset: str, device: torch.device, batches: list[int], repeats: int, stages: int, bf16: bool,
            train_batch: int = 8) -> dict:
    config = PipelineConfig(model=model_preset(preset))
    size = config.model.image_size
    torch.manual_seed(0)
    pipe = SynomalyPipeline(build_unet(config.model).to(device), config, bf16=bf16)
    rows = []
    for b in batches:
        x = images_for(b, size, device)
        t = torch.full((b,), 200, device=device)
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            forward = timed(lambda x=x, t=t: pipe.unet(x, t), repeats, device)
        out = pipe.detect(x, max_stages=stages, min_size=8)
        nfe = out.nfe.sum().item()
        detect = timed(lambda x=x: pipe.detect(x, generator=torch.Generator(device).manual_seed(0), max_stages=stages, min_size=8),
                       repeats, device)
        rows.append({"batch": b, "forward_s": forward, "detect_s": detect, "nfe": nfe,
                     "ms_per_image": 1000 * detect / b, "overhead": detect / (nfe / b * forward) - 1})
    return {"preset": preset, "parameters": count_parameters(pipe.unet), "image_size": size, "rows": rows,
            "one_at_a_time": one_at_a_time(pipe, size, device, max(batches), stages),
            "train": train_step(config, device, bf16, repeats, train_batch)}


def one_at_a_time(pipe: SynomalyPipeline, size: int, device: torch.device, n: int, stages: int) -> dict:
    """Batched ``detect`` over n images versus n calls of one image."""
    x = images_for(n, size, device)
    batched = timed(lambda: pipe.detect(x, max_stages=stages, min_size=8), 1, device)
    single = timed(lambda: [pipe.detect(x[i : i + 1], max_stages=stages, min_size=8) for i in range(n)], 1, device)
    return {"images": n, "batched_s": batched, "single_s": single, "speedup": single / batched}


def train_step(config: PipelineConfig, device: torch.device, bf16: bool, repeats: int, batch: int = 8) -> dict:
    """One optimiser step at ``batch`` and the Synomaly noise for that batch."""
    from synomaly.schedule import DiffusionSchedule

    unet = build_unet(config.model).to(device)
    schedule = DiffusionSchedule().to(device)
    optimiser = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    x = images_for(batch, config.model.image_size, device)
    noise = make_noise("synomaly", sigma=3.0 * config.model.image_size / 128)

    def step():
        t = schedule.sample_timesteps(batch, device)
        n = noise(x)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            eps = unet(schedule.q_sample(x, t, n), t)
        loss = ((eps.float() - n) ** 2).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()

    return {"batch": batch, "step_s": timed(step, repeats, device), "noise_s": timed(lambda: noise(x), repeats * 5, device)}


KINDS = (("convolution", ("conv",)), ("group norm", ("group_norm",)),
         ("attention", ("bmm", "softmax", "scaled_dot", "flash", "attention")), ("linear", ("addmm", "linear", "aten::mm")),
         ("SiLU", ("silu",)), ("copies and element-wise", ("add", "mul", "copy", "cat", "clone", "contiguous", "to", "div", "sub")))


def op_kind(name: str) -> str:
    """The kind of a profiler event (first matching entry of ``KINDS``; ``other`` for the rest)."""
    return next((kind for kind, keys in KINDS if any(k in name for k in keys)), "other")


def profile_forward(pipe: SynomalyPipeline, size: int, device: torch.device, batches: list[int], repeats: int) -> list[dict]:
    """Per-image network time at each batch (one call per batch, no chunking), split by operator kind."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    rows = []
    for b in batches:
        x, t = images_for(b, size, device), torch.full((b,), 200, device=device)
        with torch.inference_mode():
            timed(lambda x=x, t=t: pipe.network(x, t), 1, device)
            with profile(activities=activities, profile_memory=True) as prof:
                seconds = timed(lambda x=x, t=t: pipe.network(x, t), repeats, device)
        kinds: dict[str, float] = {}
        allocated = 0
        for event in prof.key_averages():
            own = event.self_device_time_total if device.type == "cuda" else event.self_cpu_time_total
            kinds[op_kind(event.key)] = kinds.get(op_kind(event.key), 0.0) + own
            allocated += max(event.self_cpu_memory_usage if device.type == "cpu" else event.self_device_memory_usage, 0)
        total = sum(kinds.values()) or 1.0
        rows.append({"batch": b, "ms_per_image": 1000 * seconds / b, "share": {k: v / total for k, v in kinds.items()},
                     "allocated_mb_per_image": allocated / (repeats + 1) / b / 2**20})
    return rows


def volume(preset: str, device: torch.device, n: int, stages: int, repeats: int, bf16_too: bool, compile_too: bool) -> dict:
    """``detect`` over an ``n``-slice volume at ``stages`` stages, run in each way; and the forward profile."""
    config = PipelineConfig(model=model_preset(preset))
    size = config.model.image_size
    torch.manual_seed(0)
    explicit = build_unet(dataclasses.replace(config.model, use_flash_attention=False)).to(device)
    torch.nn.init.normal_(explicit.out[-1].conv.weight, std=0.05)  # untrained MONAI UNets output zero: give the maps content
    fused = build_unet(dataclasses.replace(config.model, use_flash_attention=True)).to(device)
    fused.load_state_dict(explicit.state_dict())
    never = 1 << 30  # a forward batch no input reaches: no chunking
    ways = {  # name: (network, detect batch, pipeline options)
        "one image at a time (the reference's loop)": (explicit, 1, {"forward_batch": never, "channels_last": False}),
        "batch 32, as before": (explicit, 32, {"forward_batch": never, "channels_last": False}),
        "one batch, network in one call": (fused, n, {"forward_batch": never, "channels_last": False}),
        "one batch, defaults": (fused, n, {}),
    }
    if bf16_too:
        ways["one batch, defaults, bf16"] = (fused, n, {"bf16": True})
    if compile_too:
        ways["one batch, defaults, torch.compile"] = (fused, n, {"compile": True})
    if bf16_too and compile_too:
        ways["one batch, defaults, bf16 and torch.compile"] = (fused, n, {"bf16": True, "compile": True})
    pipes = {name: (SynomalyPipeline(net, config, **options), batch) for name, (net, batch, options) in ways.items()}
    x = images_for(n, size, device)
    settings = {"max_stages": stages, "tol": 0.0, "min_size": 8}

    def run(pipe: SynomalyPipeline, batch: int) -> None:
        g = torch.Generator(device).manual_seed(0)
        for start in range(0, n, batch):
            pipe.detect(x[start : start + batch], generator=g, **settings)

    warm = {}
    for name, (pipe, batch) in pipes.items():
        start = time.perf_counter()
        run(pipe, batch)  # warm-up (and compilation)
        warm[name] = time.perf_counter() - start
    t = torch.full((n,), 100, device=device)

    def forward(pipe: SynomalyPipeline) -> None:  # the network alone, as detect calls it: the floor of one stage
        with torch.inference_mode():
            pipe.network(x, t)

    floored = [name for name in ("one batch, defaults", "one batch, defaults, bf16") if name in pipes]
    times: dict[str, list[float]] = {name: [] for name in pipes}
    forwards: dict[str, list[float]] = {name: [] for name in floored}
    for _ in range(repeats):
        for name, (pipe, batch) in pipes.items():
            times[name].append(timed(lambda pipe=pipe, batch=batch: run(pipe, batch), 1, device, warm_up=False))
        for name in floored:
            forwards[name].append(timed(lambda name=name: forward(pipes[name][0]), 1, device, warm_up=False))
    default = pipes["one batch, defaults"][0]
    return {
        "preset": preset, "parameters": count_parameters(fused), "image_size": size, "slices": n, "stages": stages,
        "forward_batch": default.forward_batch, "channels_last": default.channels_last,
        "ways": [{"name": name, "seconds": statistics.median(ts), "all_seconds": ts, "first_run_seconds": warm[name],
                  "detect_batch": pipes[name][1],
                  "forward_floor_seconds": stages * statistics.median(forwards[name]) if name in forwards else None}
                 for name, ts in times.items()],
        "profile": profile_forward(SynomalyPipeline(fused, config, forward_batch=never, channels_last=False), size, device,
                                   [1, 8, 32, 64, n], max(1, repeats)),
    }


def print_volume(result: dict) -> None:
    print(f"## {result['slices']} slices x {result['stages']} stages, {result['preset']} ({result['parameters']:,} parameters, "
          f"{result['image_size']} px) on {result['device']}, commit {result['commit']}")
    print("| way | detect batch | seconds | first run s |\n|---|---:|---:|---:|")
    for w in result["ways"]:
        print(f"| {w['name']} | {w['detect_batch']} | {w['seconds']:.2f} | {w['first_run_seconds']:.2f} |")
    kinds = [k for k, _ in KINDS] + ["other"]
    print("\n| batch | ms/image | " + " | ".join(kinds) + " | allocated MB/image |\n|---:|---:|" + "---:|" * (len(kinds) + 1))
    for r in result["profile"]:
        shares = " | ".join(f"{r['share'].get(k, 0.0):.0%}" for k in kinds)
        print(f"| {r['batch']} | {r['ms_per_image']:.1f} | {shares} | {r['allocated_mb_per_image']:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--stages", type=int, default=5)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--train-batch", type=int, default=8, help="batch of the timed training step")
    parser.add_argument("--volume", type=int, default=0, help="slices of the whole-volume measurement (0: the core table)")
    parser.add_argument("--compile", action="store_true", help="volume: also with torch.compile")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads of torch (0: torch's default)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.volume:
        result = volume(args.preset, device, args.volume, args.stages, args.repeats, args.bf16, args.compile)
    else:
        result = measure(args.preset, device, args.batches, args.repeats, args.stages, args.bf16, args.train_batch)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    cpu = f"{cpu_model()}, {torch.get_num_threads()} threads"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu
    result.update({"device": name, "bf16": args.bf16, "commit": commit, "torch": torch.__version__,
                   "command": "python benchmarks/speed.py " + " ".join(sys.argv[1:])})
    if args.volume:
        print_volume(result)
        save(result, args.out)
        return
    print(f"## {args.preset} ({result['parameters']:,} parameters, {result['image_size']} px) on {name}, commit {commit}")
    print("| batch | forward ms | detect ms/image | NFE/image | overhead |\n|---:|---:|---:|---:|---:|")
    for r in result["rows"]:
        print(f"| {r['batch']} | {1000 * r['forward_s']:.1f} | {r['ms_per_image']:.1f} | {r['nfe'] / r['batch']:.2f} | {r['overhead']:.1%} |")
    o, tr = result["one_at_a_time"], result["train"]
    print(f"\nbatched detect over {o['images']} images: {o['batched_s']:.2f} s; one at a time: {o['single_s']:.2f} s ({o['speedup']:.1f}x)")
    print(f"training step (batch {tr['batch']}): {1000 * tr['step_s']:.0f} ms; Synomaly noise for the batch: {1000 * tr['noise_s']:.2f} ms")
    save(result, args.out)


def cpu_model() -> str:
    """The CPU's model name and its bfloat16 instructions (from /proc/cpuinfo where there is one)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return f"{platform.processor() or platform.machine()} CPU"
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "CPU")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    bf16 = [f for f in ("amx_bf16", "avx512_bf16") if f in flags]
    return f"{name} ({', '.join(bf16) if bf16 else 'no bfloat16 instructions'})"


def save(result: dict, out: Path | None) -> None:
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
