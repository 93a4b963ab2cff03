"""EGNN throughput: polydiff's EDM-style EGNN vs. egnn-pytorch, and sampling speed per sampler.

Training throughput is forward + backward (molecules/s) on a QM9-sized batch (64 molecules of
9 to 29 atoms) at matched depth and width (``dim = m_dim = hidden`` for egnn-pytorch, which
pads to ``[B, n_max]`` with a mask). Sampling throughput runs DDPM-1000, DDIM-100 and
DPM-Solver++(2M)-20 through ``polydiff.samplers``; ``--quick`` (CPU) runs each sampler for a
few steps and extrapolates to the full step count, and says so.

    python benchmarks/bench_egnn.py --quick
    python benchmarks/bench_egnn.py --device cuda
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from domains.molecule.egnn import EGNN
from polydiff import RaggedSpace

F = 6  # QM9: H, C, N, O, F one-hot + atomic number


def qm9_like_batch(b: int, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(9, 30, (b,), generator=g)  # [B] QM9 molecules have 3..29 atoms, mostly 9+
    batch = torch.repeat_interleave(torch.arange(b), sizes)
    space = RaggedSpace(batch, b, 3 + F, centered=(0, 1, 2))
    x = space.randn(generator=g)
    return x.to(device), batch.to(device), sizes, space.to(device)


class EgnnPytorchNet(nn.Module):
    """egnn-pytorch layers at the same depth and width, with the same input/output heads."""

    def __init__(self, hidden: int, layers: int) -> None:
        super().__init__()
        from egnn_pytorch import EGNN as Layer

        self.embed = nn.Linear(F + 1, hidden)
        self.layers = nn.ModuleList(Layer(dim=hidden, m_dim=hidden) for _ in range(layers))
        self.out = nn.Linear(hidden, F)

    def forward(self, feats, coors, t, mask):  # [B, n, F], [B, n, 3], [B], [B, n]
        h = self.embed(torch.cat([feats, t[:, None, None].expand(-1, feats.shape[1], 1)], -1))
        x = coors
        for layer in self.layers:
            h, x = layer(h, x, mask=mask)
        return torch.cat([x - coors, self.out(h)], -1)


def _dense(x, batch, sizes):
    b, n = len(sizes), int(sizes.max())
    ptr = torch.cumsum(sizes, 0) - sizes
    idx = torch.arange(x.shape[0], device=x.device) - ptr.to(x.device)[batch]
    dense = x.new_zeros(b, n, x.shape[1])
    dense[batch, idx] = x
    mask = torch.zeros(b, n, dtype=torch.bool, device=x.device)
    mask[batch, idx] = True
    return dense, mask


def _time(fn, device, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


def train_throughput(args, device) -> dict:
    x, batch, sizes, _ = qm9_like_batch(args.batch, device)
    t = torch.rand(args.batch, device=device)
    ours = EGNN(F, hidden=args.hidden, layers=args.layers).to(device)
    theirs = EgnnPytorchNet(args.hidden, args.layers).to(device)
    dense, mask = _dense(x, batch, sizes)

    def step_ours():
        ours.zero_grad(set_to_none=True)
        ours(x, t, batch).square().mean().backward()

    def step_theirs():
        theirs.zero_grad(set_to_none=True)
        theirs(dense[..., 3:], dense[..., :3], t, mask).square().mean().backward()

    n_params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    s_ours = _time(step_ours, device, args.warmup, args.reps)
    s_theirs = _time(step_theirs, device, args.warmup, args.reps)
    print(f"train fwd+bwd, {args.batch} molecules ({int(sizes.sum())} atoms, 9-29 each), hidden {args.hidden}, {args.layers} layers, {device}")
    print(f"  polydiff EGNN   {args.batch / s_ours:9.1f} molecules/s  ({s_ours * 1e3:8.1f} ms/batch, {n_params(ours) / 1e6:.2f}M params)")
    print(f"  egnn-pytorch    {args.batch / s_theirs:9.1f} molecules/s  ({s_theirs * 1e3:8.1f} ms/batch, {n_params(theirs) / 1e6:.2f}M params)")
    print(f"  ratio           {s_theirs / s_ours:9.2f}x")
    return {
        "batch": args.batch, "atoms": int(sizes.sum()), "hidden": args.hidden, "layers": args.layers,
        "polydiff_molecules_per_s": args.batch / s_ours, "egnn_pytorch_molecules_per_s": args.batch / s_theirs,
        "polydiff_params": n_params(ours), "egnn_pytorch_params": n_params(theirs),
        "ratio_polydiff_over_egnn_pytorch": s_theirs / s_ours,
    }


@torch.no_grad()
def sampling_throughput(args, device) -> dict:
    from polydiff.objectives import Objective
    from polydiff.samplers import sample
    from polydiff.schedules import make_schedule

    net = EGNN(F, hidden=args.hidden, layers=args.layers).to(device).eval()
    schedule = make_schedule("polynomial", steps=1000, power=2)
    objective = Objective(prediction="eps")
    x, batch, sizes, space = qm9_like_batch(args.sample_batch, device, seed=1)
    den = objective.denoiser(net, schedule, space, {"batch": batch})
    print(f"sampling, {args.sample_batch} molecules per batch, {device}")
    rows = {}
    for name, steps in (("ddpm", 1000), ("ddim", 100), ("dpmpp_2m", 20)):
        run_steps = min(steps, args.max_sampler_steps)
        gen = torch.Generator(device=device).manual_seed(0)
        sample(name, den, x, schedule, min(run_steps, 2), space=space, generator=gen)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = sample(name, den, x, schedule, run_steps, space=space, generator=gen)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) * steps / run_steps
        assert torch.isfinite(out).all()
        note = "" if run_steps == steps else f"  (extrapolated from {run_steps} steps)"
        print(f"  {name:9s} {steps:5d} steps  {args.sample_batch / dt:9.2f} molecules/s  {dt:8.2f} s/batch{note}")
        rows[f"{name}-{steps}"] = {"molecules_per_s": args.sample_batch / dt, "timed_steps": run_steps}
    return rows


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CPU-sized run: small model, few repetitions, truncated samplers")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--hidden", type=int, default=None, help="width (default 256, --quick 64)")
    p.add_argument("--layers", type=int, default=None, help="depth (default 9, --quick 4)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--sample-batch", type=int, default=None, help="molecules per sampling batch (default 256, --quick 64)")
    p.add_argument("--skip-sampling", action="store_true")
    args = p.parse_args(argv)
    args.hidden = args.hidden or (64 if args.quick else 256)
    args.layers = args.layers or (4 if args.quick else 9)
    args.sample_batch = args.sample_batch or (64 if args.quick else 256)
    args.warmup, args.reps = (1, 3) if args.quick else (3, 10)
    args.max_sampler_steps = 10 if args.quick else 10_000
    device = torch.device(args.device)
    if device.type == "cpu" and args.quick:
        torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    result = {"device": str(device), "train": train_throughput(args, device)}
    if not args.skip_sampling:
        result["sampling"] = sampling_throughput(args, device)
    return result


if __name__ == "__main__":
    main()
