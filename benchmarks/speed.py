"""Speed of the core operations for one UNet preset on one device (docs/benchmarks.md, "Speed").

Measures, in one run: the network forward time at batch B, ``detect`` time over N images at
batch B with the resulting overhead ``detect / (NFE x forward) - 1``, batched versus
one-image-at-a-time ``detect``, one training step (forward, backward, AdamW) and the Synomaly
noise generation for one training batch. Writes JSON and prints a Markdown table.

    python benchmarks/speed.py --preset small --device cpu --batches 1 8 --out benchmarks/results/speed/cpu-small.json
"""

from __future__ import annotations

import argparse
import json
import platform
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


def timed(fn, repeats: int, device: torch.device) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` runs, after one warm-up run."""
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
    return sorted(times)[len(times) // 2]


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--stages", type=int, default=5)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--train-batch", type=int, default=8, help="batch of the timed training step")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    result = measure(args.preset, device, args.batches, args.repeats, args.stages, args.bf16, args.train_batch)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    cpu = f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu
    result.update({"device": name, "bf16": args.bf16, "commit": commit, "torch": torch.__version__,
                   "command": "python benchmarks/speed.py " + " ".join(sys.argv[1:])})
    print(f"## {args.preset} ({result['parameters']:,} parameters, {result['image_size']} px) on {name}, commit {commit}")
    print("| batch | forward ms | detect ms/image | NFE/image | overhead |\n|---:|---:|---:|---:|---:|")
    for r in result["rows"]:
        print(f"| {r['batch']} | {1000 * r['forward_s']:.1f} | {r['ms_per_image']:.1f} | {r['nfe'] / r['batch']:.2f} | {r['overhead']:.1%} |")
    o, tr = result["one_at_a_time"], result["train"]
    print(f"\nbatched detect over {o['images']} images: {o['batched_s']:.2f} s; one at a time: {o['single_s']:.2f} s ({o['speedup']:.1f}x)")
    print(f"training step (batch {tr['batch']}): {1000 * tr['step_s']:.0f} ms; Synomaly noise for the batch: {1000 * tr['noise_s']:.2f} ms")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
