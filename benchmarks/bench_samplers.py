"""Sampler overhead per step against diffusers' schedulers, driving the same denoiser on the same tensors.

Everything but the network call counts as overhead. For timing, the "network" returns a
precomputed tensor, so the whole loop is the sampler's own cost; runs of polydiff and
diffusers alternate and the best of each is kept. For the comparison of outputs, both drive
a fixed function of ``(x, t)`` (they agree to float32 precision).

    python benchmarks/bench_samplers.py [--shape 16 1 16000] [--steps 50] [--repeats 5] [--out result.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from polydiff.objectives import to_prediction
from polydiff.samplers import sample_ddim, sample_dpmpp_2m
from polydiff.schedules import make_schedule
from polydiff.space import DenseSpace

T = 1000


def toy_eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A fixed, cheap stand-in for a network: eps depends on x and on t."""
    return x * (0.5 + 0.4 * t.reshape(-1, *([1] * (x.dim() - 1))))


def run(shape: tuple[int, ...], steps: int, repeats: int, device: str) -> dict:
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    schedule = make_schedule("cosine", T)
    space = DenseSpace(shape, device_=dev)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dev)
    fixed = 0.5 * torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dev)
    nets = {"toy": toy_eps, "null": lambda x, t: fixed}  # "null": zero-cost network for timing

    def ours(sampler, net):
        def denoiser(x, t):
            a, s = schedule.alpha_sigma(t, dtype=x.dtype)
            return to_prediction("eps", net(x, t), x, space.expand(a), space.expand(s))

        return sampler(denoiser, noise, schedule, steps, space=space)

    def theirs(scheduler, net):
        scheduler.set_timesteps(steps, device=dev)
        x = noise
        for k in scheduler.timesteps:
            t = torch.full((shape[0],), (int(k) + 1) / T, device=dev)
            x = scheduler.step(net(x, t), k, x).prev_sample
        return x

    common = dict(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing", prediction_type="epsilon")
    peers = {
        "ddim": (sample_ddim, DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=True)),
        "dpmpp_2m": (
            sample_dpmpp_2m,
            DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="zero"),
        ),
    }

    def timed(fn) -> float:
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0

    results = {}
    for name, (sampler, scheduler) in peers.items():
        x_ours, x_theirs = ours(sampler, nets["toy"]), theirs(scheduler, nets["toy"])
        diff = (x_ours - x_theirs).abs().max().item()
        best_ours, best_theirs = float("inf"), float("inf")
        for _ in range(repeats):  # alternate, so load changes hit both alike
            best_ours = min(best_ours, timed(lambda: ours(sampler, nets["null"])))
            best_theirs = min(best_theirs, timed(lambda: theirs(scheduler, nets["null"])))
        results[name] = {
            "steps": steps,
            "polydiff_overhead_us_per_step": best_ours / steps * 1e6,
            "diffusers_overhead_us_per_step": best_theirs / steps * 1e6,
            "ratio_polydiff_over_diffusers": best_ours / best_theirs,
            "max_abs_diff": diff,
            "max_rel_diff": diff / max(x_theirs.abs().max().item(), 1e-12),
        }
    return {"shape": list(shape), "device": str(dev), "samplers": results}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", type=int, nargs="+", default=[16, 1, 16000])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    result = run(tuple(a.shape), a.steps, a.repeats, a.device)
    print(f"sampler overhead per step (network excluded), state {tuple(a.shape)} on {result['device']}")
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
