"""Audio sampling speed: seconds of audio generated per wall-clock second, per sampler.

Builds the audio recipe's U-Net (random weights unless ``--run`` points at a trained run:
speed does not depend on the weights) and times DDPM-200, DDIM-50 and DPM-Solver++(2M)-20
(Lu et al. 2022) on class-conditional batches with classifier-free guidance, so every step
evaluates the network on the conditional and unconditional rows, as in real use (the default:
one stacked call on CUDA, two calls elsewhere); the last sampler is then timed both ways
(``guidance.batched=true`` and ``false``).

    python benchmarks/bench_audio_sampling.py --device cuda            # recipe defaults, 16 kHz
    python benchmarks/bench_audio_sampling.py --quick                  # CPU profile sizes, seconds
    python benchmarks/bench_audio_sampling.py --profile cpu --n 16     # CPU profile, full step counts
    python benchmarks/bench_audio_sampling.py --run RUN_DIR --out result.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from polydiff.build import Parts, load_run, resolve_device
from polydiff.generate import generate
from polydiff.recipes import compose_recipe

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "audio_unet.yaml"
SAMPLERS = [("ddpm", 200), ("ddim", 50), ("dpmpp_2m", 20)]


def build(run: Path | None, profile: str) -> Parts:
    """The recipe's parts (or a trained run's), without reading the data set."""
    if run is not None:
        return load_run(run)[0]
    from omegaconf import OmegaConf

    from polydiff.build import build_domain

    cfg = OmegaConf.to_container(compose_recipe(RECIPE, [f"profile={profile}"]), resolve=True)
    return Parts.from_config(cfg, domain_state=build_domain(cfg["domain"]).state_dict())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--quick", action="store_true", help="the CPU profile's model and rate, 2 clips, steps / 10")
    parser.add_argument("--profile", default=None, help="the recipe profile to time: gpu (default) or cpu")
    parser.add_argument("--run", type=Path, default=None, help="time a trained run's network instead")
    parser.add_argument("--n", type=int, default=None, help="clips per batch (default 16, quick 2)")
    parser.add_argument("--guidance", type=float, default=2.0, help="guidance scale (1 = one network call per step)")
    parser.add_argument("--repeats", type=int, default=2, help="timed repeats per sampler; the best is kept")
    parser.add_argument("--out", type=Path, default=None, help="write the result as JSON")
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    profile = args.profile or ("cpu" if args.quick else "gpu")
    parts = build(args.run, profile)
    net = parts.net.to(device).eval()
    domain = parts.domain
    n = args.n or (2 if args.quick else 16)
    seconds_per_clip = domain.sample_shape[-1] / domain.sample_rate
    labels = domain.default_labels(n, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    precision = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    )

    def best_seconds(name: str, steps: int, batched: bool | None = None) -> float:
        """The fastest of ``--repeats`` timed draws (after one warm-up draw)."""
        best = float("inf")
        for r in range(args.repeats + 1):  # the first run warms up kernels and caches
            gen = torch.Generator(device=device).manual_seed(r)
            sync()
            start = time.perf_counter()
            with precision:
                batch = generate(
                    domain,
                    net,
                    parts.schedule,
                    parts.objective,
                    n,
                    sampler={"name": name, "steps": steps},
                    guidance={"scale": args.guidance, "batched": batched},
                    labels=labels,
                    device=device,
                    generator=gen,
                )
            sync()
            if r > 0 or args.repeats == 0:
                best = min(best, time.perf_counter() - start)
        assert torch.isfinite(batch.x).all()
        return best

    rows = []
    for name, steps in SAMPLERS:
        steps = max(2, steps // 10) if args.quick else steps
        best = best_seconds(name, steps)
        rows.append(
            {
                "sampler": name,
                "steps": steps,
                "clips": n,
                "seconds": best,
                "audio_seconds_per_second": n * seconds_per_clip / best,
            }
        )
        print(
            f"{name:>9} {steps:4d} steps: {n} x {seconds_per_clip:g} s clips in {best:.2f} s "
            f"-> {rows[-1]['audio_seconds_per_second']:.2f} s of audio per second",
            flush=True,
        )
    stacked = None
    if args.guidance != 1.0:  # guidance: one network call on [x; x] against two calls per step
        name, steps = rows[-1]["sampler"], rows[-1]["steps"]
        one, two = best_seconds(name, steps, batched=True), best_seconds(name, steps, batched=False)
        stacked = {
            "sampler": name,
            "steps": steps,
            "stacked_seconds": one,
            "two_call_seconds": two,
            "ratio_two_calls_over_stacked": two / one,
        }
        print(
            f"guidance, {name}-{steps}: two network calls per step {two:.2f} s, one stacked call {one:.2f} s "
            f"(x{two / one:.2f}; the default on this device: {'stacked' if device.type == 'cuda' else 'two calls'})",
            flush=True,
        )
    result = {
        "benchmark": "audio_sampling",
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "sample_rate": domain.sample_rate,
        "clip_seconds": seconds_per_clip,
        "guidance": args.guidance,
        "parameters": sum(p.numel() for p in net.parameters()),
        "quick": args.quick,
        "profile": None if args.run else profile,
        "rows": rows,
        "guidance_calls": stacked,
    }
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
