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
from typing import Optional

import torch

from polydiff.objectives import Objective
from polydiff.samplers import sample
from polydiff.schedules import NoiseSchedule, make_schedule
from polydiff.space import DenseSpace

T = 1000
# polydiff's prediction names -> diffusers' ``prediction_type``
PREDICTION_TYPE = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


def toy_eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A fixed, cheap stand-in for a network: eps depends on x and on t."""
    return x * (0.5 + 0.4 * t.reshape(-1, *([1] * (x.dim() - 1))))


def diffusers_scheduler(name: str, schedule: NoiseSchedule, prediction: str = "eps", clip_x0: Optional[float] = None):
    """diffusers' counterpart of polydiff's sampler ``name``: the same betas, trailing spacing and x0 clipping."""
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    common = dict(
        num_train_timesteps=schedule.num_steps,
        trained_betas=schedule.betas.float().numpy(),
        timestep_spacing="trailing",
        prediction_type=PREDICTION_TYPE[prediction],
    )
    clip = dict(clip_sample=clip_x0 is not None, clip_sample_range=clip_x0 or 1.0)
    if name == "ddpm":
        return DDPMScheduler(**common, **clip, variance_type="fixed_small")
    if name == "ddim":
        return DDIMScheduler(**common, **clip, set_alpha_to_one=True)
    if name == "dpmpp_2m":
        if clip_x0 not in (None, 1.0):
            raise ValueError(f"diffusers' DPM-Solver++ clips x0 to [-1, 1] only (thresholding), not to {clip_x0}")
        # Dynamic thresholding with sample_max_value = 1 is a fixed clip to [-1, 1].
        return DPMSolverMultistepScheduler(
            **common,
            algorithm_type="dpmsolver++",
            solver_order=2,
            final_sigmas_type="zero",
            thresholding=clip_x0 is not None,
            sample_max_value=1.0,
        )
    raise KeyError(f"no diffusers counterpart for sampler {name!r}")


def drive_diffusers(scheduler, net, noise: torch.Tensor, steps: int, generator=None) -> torch.Tensor:
    """Run a diffusers scheduler with ``net(x, t)`` (t continuous: diffusers' timestep k is t = (k + 1) / T)."""
    from diffusers import DDIMScheduler

    scheduler.set_timesteps(steps, device=noise.device)
    T_train = scheduler.config.num_train_timesteps
    extra = {} if generator is None else {"generator": generator}
    if isinstance(scheduler, DDIMScheduler):  # eps re-derived from a clipped x0, as polydiff does
        extra["use_clipped_model_output"] = True
    x = noise
    for k in (
        scheduler.timesteps
    ):  # on noise's device, as diffusers' pipelines pass them: no int(k), a host sync a step on a GPU
        t = ((k.to(torch.float64) + 1) / T_train).to(noise.dtype).reshape(1).repeat(noise.shape[0])  # [B]
        x = scheduler.step(net(x, t), k, x, **extra).prev_sample
    return x


def compare_on_network(
    net,
    objective: Objective,
    schedule: NoiseSchedule,
    space: DenseSpace,
    noise: torch.Tensor,
    samplers: list[tuple[str, int]],
    seed: int = 0,
    clip_x0: Optional[float] = None,
) -> list[dict]:
    """polydiff's and diffusers' samplers driving the same network ``net(x, t)`` from the same noise.

    Outputs are compared element by element; DDPM's two runs get generators with the same seed
    (both libraries then draw the same noise, one state-shaped draw per step). Each row keeps both outputs.
    """
    dev = noise.device
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    den = objective.denoiser(net, schedule, space)
    gen = lambda: torch.Generator(device=dev).manual_seed(seed)  # noqa: E731
    rows = []
    for name, steps in samplers:
        scheduler = diffusers_scheduler(name, schedule, objective.prediction, clip_x0)
        sync()
        t0 = time.perf_counter()
        ours = sample(name, den, noise, schedule, steps, space=space, generator=gen(), clip_x0=clip_x0)
        sync()
        t1 = time.perf_counter()
        theirs = drive_diffusers(scheduler, net, noise, steps, generator=gen() if name == "ddpm" else None)
        sync()
        t2 = time.perf_counter()
        row = {
            "sampler": name,
            "steps": steps,
            "polydiff_s": t1 - t0,
            "diffusers_s": t2 - t1,
            "ratio_polydiff_over_diffusers": (t1 - t0) / (t2 - t1),
            "x_polydiff": ours,
            "x_diffusers": theirs,
        }
        diff = (ours - theirs).abs().max().item()
        row["max_rel_diff"] = diff / max(theirs.abs().max().item(), 1e-12)
        rows.append(row)
    return rows


def run(shape: tuple[int, ...], steps: int, repeats: int, device: str) -> dict:
    """Overhead per step with a zero-cost network, and outputs on a fixed function of ``(x, t)``."""
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    schedule = make_schedule("cosine", T)
    space = DenseSpace(shape, device_=dev)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dev)
    fixed = 0.5 * torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dev)
    null = lambda x, t: fixed  # noqa: E731  (a zero-cost network, for timing)
    objective = Objective(prediction="eps")
    null_den = objective.denoiser(null, schedule, space)

    def timed(fn) -> float:
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0

    results = {}
    for row in compare_on_network(toy_eps, objective, schedule, space, noise, [("ddim", steps), ("dpmpp_2m", steps)]):
        name = row["sampler"]
        scheduler = diffusers_scheduler(name, schedule)
        best_ours, best_theirs = float("inf"), float("inf")
        for _ in range(repeats):  # alternate, so load changes hit both alike
            best_ours = min(best_ours, timed(lambda: sample(name, null_den, noise, schedule, steps, space=space)))
            best_theirs = min(best_theirs, timed(lambda: drive_diffusers(scheduler, null, noise, steps)))
        results[name] = {
            "steps": steps,
            "polydiff_overhead_us_per_step": best_ours / steps * 1e6,
            "diffusers_overhead_us_per_step": best_theirs / steps * 1e6,
            "ratio_polydiff_over_diffusers": best_ours / best_theirs,
            "max_abs_diff": (row["x_polydiff"] - row["x_diffusers"]).abs().max().item(),
            "max_rel_diff": row["max_rel_diff"],
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
        print(
            f"  {name:9s} polydiff {r['polydiff_overhead_us_per_step']:8.1f} us   diffusers "
            f"{r['diffusers_overhead_us_per_step']:8.1f} us   ratio {r['ratio_polydiff_over_diffusers']:.2f}   "
            f"max |diff| {r['max_abs_diff']:.2e} (rel {r['max_rel_diff']:.1e})"
        )
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
