"""Sampler overhead per step against diffusers' schedulers, driving the same denoiser on the same tensors.

Everything but the network call counts as overhead. The network here is a cheap fixed
function of ``(x, t)``, timed on its own and subtracted, so the figure is the sampler's own
cost per step. Outputs of matching settings are compared (they agree to float32 precision).

    python benchmarks/bench_samplers.py [--shape 16 1 16000] [--steps 50] [--repeats 5] [--out result.json]
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Callable

import torch

from polydiff.objectives import to_prediction
from polydiff.samplers import sample_ddim, sample_dpmpp_2m
from polydiff.schedules import make_schedule
from polydiff.space import DenseSpace

T = 1000


def toy_eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A fixed, cheap stand-in for a network: eps depends on x and on t."""
    return x * (0.5 + 0.4 * t.reshape(-1, *([1] * (x.dim() - 1))))


def _best(fn: Callable[[], torch.Tensor], repeats: int, sync: Callable[[], None]) -> tuple[float, torch.Tensor]:
    out, times = None, []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t0)
    return min(times), out


def run(shape: tuple[int, ...], steps: int, repeats: int, device: str) -> dict:
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    schedule = make_schedule("cosine", T)
    space = DenseSpace(shape, device_=dev)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dev)

    def denoiser(x, t):
        a, s = schedule.alpha_sigma(t, dtype=x.dtype)
        return to_prediction("eps", toy_eps(x, t), x, space.expand(a), space.expand(s))

    common = dict(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing", prediction_type="epsilon")
    peers = {
        "ddim": (
            lambda: sample_ddim(denoiser, noise, schedule, steps, space=space),
            DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=True),
        ),
        "dpmpp_2m": (
            lambda: sample_dpmpp_2m(denoiser, noise, schedule, steps, space=space),
            DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="zero"),
        ),
    }

    # The network alone, called as often as a sampler calls it.
    t_batch = torch.full((shape[0],), 0.5, device=dev)
    net_time, _ = _best(lambda: [toy_eps(noise, t_batch) for _ in range(steps)][-1], repeats, sync)

    results = {}
    for name, (ours, scheduler) in peers.items():

        def theirs(scheduler=scheduler):
            scheduler.set_timesteps(steps, device=dev)
            x = noise
            for k in scheduler.timesteps:
                t = torch.full((shape[0],), (int(k) + 1) / T, device=dev)
                x = scheduler.step(toy_eps(x, t), k, x).prev_sample
            return x

        ours()
        theirs()  # warm-up
        t_ours, x_ours = _best(ours, repeats, sync)
        t_theirs, x_theirs = _best(theirs, repeats, sync)
        over_ours = max(t_ours - net_time, 0.0) / steps
        over_theirs = max(t_theirs - net_time, 0.0) / steps
        diff = (x_ours - x_theirs).abs().max().item()
        scale = x_theirs.abs().max().item()
        results[name] = {
            "steps": steps,
            "polydiff_overhead_us_per_step": over_ours * 1e6,
            "diffusers_overhead_us_per_step": over_theirs * 1e6,
            "ratio_polydiff_over_diffusers": over_ours / max(over_theirs, 1e-12),
            "max_abs_diff": diff,
            "max_rel_diff": diff / max(scale, 1e-12),
        }
    return {"shape": list(shape), "device": str(dev), "network_us_per_call": net_time / steps * 1e6, "samplers": results}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", type=int, nargs="+", default=[16, 1, 16000])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    result = run(tuple(a.shape), a.steps, a.repeats, a.device)
    print(f"sampler overhead per step, state {tuple(a.shape)} on {result['device']} "
          f"(network {result['network_us_per_call']:.0f} us/call, subtracted)")
    for name, r in result["samplers"].items():
        print(f"  {name:9s} polydiff {r['polydiff_overhead_us_per_step']:8.1f} us   diffusers "
              f"{r['diffusers_overhead_us_per_step']:8.1f} us   ratio {r['ratio_polydiff_over_diffusers']:.2f}   "
              f"max |diff| {r['max_abs_diff']:.2e} (rel {r['max_rel_diff']:.1e})")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
