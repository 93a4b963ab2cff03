"""Latent against waveform audio sampling: seconds of audio per wall-clock second at equal sampler steps.

Times the waveform recipe (``recipes/audio_unet.yaml``) and the latent one (``recipes/audio_latent.yaml``,
``latent.autoencoder=mel``) with the same sampler, steps, guidance and clip count; the latent row includes decoding
(inverse mel filter bank and Griffin-Lim), timed apart as well, and the first stage's one-off cost (encoding the
training split) is reported separately. Weights are random unless ``--run`` / ``--latent-run`` name trained runs:
speed does not depend on them.

    python benchmarks/bench_latent.py --profile cpu --n 16
    python benchmarks/bench_latent.py --latent-run runs/audio_latent --run runs/audio --out result.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from polydiff.build import Parts, load_run, resolve_device
from polydiff.generate import generate
from polydiff.recipes import compose_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def build(recipe: str, run: Path | None, profile: str) -> Parts:
    """A recipe's parts with random weights (set up from its data), or a trained run's."""
    if run is not None:
        return load_run(run)[0]
    cfg = OmegaConf.to_container(compose_recipe(RECIPES / f"{recipe}.yaml", [f"profile={profile}"]), resolve=True)
    return Parts.from_config(cfg)


def time_draw(parts: Parts, n: int, sampler: dict, guidance: float, repeats: int) -> tuple[float, float, float]:
    """The fastest of ``repeats`` draws of ``n`` clips after one warm-up: ``(seconds in all, seconds decoding, CPU
    seconds of this process)``; on a shared machine the CPU seconds are the steadier figure."""
    domain = parts.domain
    labels = domain.default_labels(n)
    best, best_decode, best_cpu = float("inf"), 0.0, float("inf")
    for r in range(repeats + 1):
        start, cpu_start = time.perf_counter(), time.process_time()
        batch = generate(
            domain,
            parts.net.eval(),
            parts.schedule,
            parts.objective,
            n,
            sampler=sampler,
            guidance={"scale": guidance},
            labels=labels,
            generator=torch.Generator().manual_seed(r),
        )
        mid = time.perf_counter()
        decoded = domain.outputs.decoded(batch) if hasattr(domain.outputs, "decoded") else batch  # waves [n, C, L]
        end = time.perf_counter()
        assert decoded.x.dim() == 3
        if r > 0 and end - start < best:
            best, best_decode = end - start, end - mid
        if r > 0:
            best_cpu = min(best_cpu, time.process_time() - cpu_start)
    return best, best_decode, best_cpu


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="cpu", help="the recipes' profile: cpu (default) or gpu")
    parser.add_argument("--run", type=Path, default=None, help="a trained waveform run instead of random weights")
    parser.add_argument("--latent-run", type=Path, default=None, help="a trained latent run instead of random weights")
    parser.add_argument("--n", type=int, default=16, help="clips per draw")
    parser.add_argument("--sampler", default="dpmpp_2m")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=2, help="timed draws per model; the fastest is kept")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None, help="write the result as JSON")
    args = parser.parse_args(argv)
    resolve_device(args.device)
    sampler = {"name": args.sampler, "steps": args.steps}
    rows = []
    for name, recipe, run in (("waveform", "audio_unet", args.run), ("latent", "audio_latent", args.latent_run)):
        parts = build(recipe, run, args.profile)
        domain = getattr(parts.domain, "inner", parts.domain)
        clip = domain.sample_shape[-1] / domain.sample_rate
        encode = None
        if name == "latent":  # the first stage's one-off cost: encoding the training split (not the cache read)
            x = torch.stack([domain.dataset("train")[i][0] for i in range(len(domain.dataset("train")))])
            start = time.perf_counter()
            with torch.no_grad():
                parts.domain.autoencoder.encode(x)
            encode = {"clips": len(x), "seconds": time.perf_counter() - start}
        seconds, decode, cpu = time_draw(parts, args.n, sampler, args.guidance, args.repeats)
        rows.append(
            {
                "model": name,
                "recipe": recipe,
                "sample_rate": domain.sample_rate,
                "clip_seconds": clip,
                "parameters": sum(p.numel() for p in parts.net.parameters()),
                "seconds": seconds,
                "decode_seconds": decode,
                "audio_seconds_per_second": args.n * clip / seconds,
                "cpu_seconds": cpu,
                "audio_seconds_per_cpu_second": args.n * clip / cpu,
                "first_stage_encode": encode,
            }
        )
        print(
            f"{name:>8} ({recipe}, {domain.sample_rate} Hz, {rows[-1]['parameters'] / 1e6:.2f}M parameters): "
            f"{args.n} x {clip:g} s in {seconds:.2f} s (decoding {decode:.2f} s) -> "
            f"{rows[-1]['audio_seconds_per_second']:.2f} s of audio per second "
            f"({cpu:.2f} CPU-s: {rows[-1]['audio_seconds_per_cpu_second']:.2f} per CPU-second)"
            + (f"; first stage: {encode['clips']} clips encoded in {encode['seconds']:.2f} s" if encode else ""),
            flush=True,
        )
    result = {"benchmark": "latent_audio_sampling", "sampler": sampler, "guidance": args.guidance, "rows": rows}
    ratio = rows[1]["audio_seconds_per_second"] / rows[0]["audio_seconds_per_second"]
    cpu_ratio = rows[1]["audio_seconds_per_cpu_second"] / rows[0]["audio_seconds_per_cpu_second"]
    print(f"latent / waveform: x{ratio:.2f} (wall clock), x{cpu_ratio:.2f} (CPU time)")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
