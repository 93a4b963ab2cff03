"""EGNN throughput: polydiff's EDM-style EGNN vs. egnn-pytorch, and sampling speed per sampler.

Training throughput is forward + backward (molecules/s) on a QM9-sized batch (64 molecules of
9 to 29 atoms) at matched depth and width (``dim = m_dim = hidden`` for egnn-pytorch, which
pads to ``[B, n_max]`` with a mask). Sampling throughput runs DDPM-1000, DDIM-100 and
DPM-Solver++(2M)-20 through ``polydiff.samplers``; ``--quick`` (CPU) runs each sampler for a
few steps and extrapolates to the full step count, and says so.

The layout section (``--only layout``; ``--skip-layout`` leaves it out) compares the EGNN's
edge list with a dense ``[B, n_max, n_max]`` layout with pair masks (``DenseEGNN``: the same
network on the same weights): it prints the largest output difference between the two, then
forward + backward molecules/s of each (alternating repetitions after warm-up, median step) and
the peak memory of one step after a warm-up step, each layout in a fresh process (CUDA allocator
peak on a GPU; on a CPU, growth of the peak resident set after returning the heap's free pages),
and the tensors autograd saves for backward (the activation memory, independent of the allocator).

    python benchmarks/bench_egnn.py --quick
    python benchmarks/bench_egnn.py --device cuda
    python benchmarks/bench_egnn.py --only layout --hidden 128 --layers 4
    TORCHINDUCTOR_FORCE_DISABLE_CACHES=1 python benchmarks/bench_egnn.py --only compile --hidden 64 \\
        --layers 4 --batch 32

The compile section (``--only compile``) counts the graphs and graph breaks ``torch.compile``
traces, the time until compilation settles over batches whose atom counts change, and then the
compiled against the eager step (disable Inductor's on-disk caches, as above, or a second run
compiles from cache).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from benchmarks.memory import peak_rss_kib, release_free_heap, reset_peak_rss, run_isolated
from domains.molecule.egnn import EGNN
from polydiff import RaggedSpace

F = 6  # QM9: H, C, N, O, F one-hot + atomic number
SECTIONS = ("train", "layout", "sampling", "compile")


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


def _slots(batch: Tensor, sizes: Tensor) -> Tensor:
    """Each row's position within its molecule (rows grouped by molecule, in order): ``[N]``."""
    ptr = torch.cumsum(sizes, 0) - sizes  # [B] first row of each molecule
    return torch.arange(batch.shape[0], device=batch.device) - ptr.to(batch.device)[batch]


def _dense(x, batch, sizes):
    b, n = len(sizes), int(sizes.max())
    idx = _slots(batch, sizes)
    dense = x.new_zeros(b, n, x.shape[1])
    dense[batch, idx] = x
    mask = torch.zeros(b, n, dtype=torch.bool, device=x.device)
    mask[batch, idx] = True
    return dense, mask


def _unpad(dense: Tensor, batch: Tensor, sizes: Tensor) -> Tensor:
    """Inverse of :func:`_dense`: ``[B, n_max, C] -> [N, C]`` in the ragged row order."""
    return dense[batch, _slots(batch, sizes)]


# ------------------------------------------------------------------ the dense layout, same weights
def _pair_mlp_dense(mlp: nn.Module, h: Tensor, e: Tensor) -> Tensor:
    """The EGNN's ``MLP([h_i, h_j, e_ij])`` on every pair of a padded batch.

    ``[B, n, H], [B, n, n, 2] -> [B, n, n, H]``.
    """
    a, b = mlp.node_proj(h).chunk(2, dim=-1)  # [B, n, H] each: W_i h_i (+ bias), W_j h_j
    pre = a[:, :, None, :] + b[:, None, :, :] + mlp.edge_proj(e)  # [B, n, n, H]
    return mlp.act(mlp.out(mlp.act(pre)))  # [B, n, n, H]


def _block_dense(block: nn.Module, h: Tensor, x: Tensor, d0: Tensor, pair: Tensor) -> tuple[Tensor, Tensor]:
    """One EDM block (Satorras et al. 2021 Eq. 3-6, EDM's bounded Eq. 4) with non-edges zeroed by ``pair``.

    ``h [B, n, H]``, ``x [B, n, 3]``, ``d0 [B, n, n, 1]`` initial squared distances, ``pair [B, n, n, 1]``
    1 where ``i != j`` are both real atoms; the sums over ``j`` then equal the edge list's ``index_add_``.
    """
    diff = x[:, :, None, :] - x[:, None, :, :]  # [B, n, n, 3] x_i - x_j
    d2 = (diff * diff).sum(-1, keepdim=True)  # [B, n, n, 1]
    e = torch.cat([d2, d0], dim=-1)  # [B, n, n, 2]
    m = _pair_mlp_dense(block.edge_mlp, h, e)  # [B, n, n, H] messages m_ij
    if block.att is not None:
        m = m * block.att(m)  # sigmoid attention gate
    agg = (m * pair).sum(2) / block.agg_norm  # [B, n, H]
    h = h + block.node_mlp(torch.cat([h, agg], dim=-1))  # [B, n, H]
    unit = diff / (torch.sqrt(d2 + 1e-8) + block.norm_constant)  # [B, n, n, 3]
    scale = torch.tanh(block.coord_out(_pair_mlp_dense(block.coord_mlp, h, e))) * block.coords_range  # [B, n, n, 1]
    x = x + (unit * scale * pair).sum(2) / block.agg_norm  # [B, n, 3]
    return h, x


class DenseEGNN(nn.Module):
    """``EGNN``'s network function on a padded batch with masks, running the wrapped EGNN's own weights.

    ``forward(x [B, n, 3+F], t [B], mask [B, n] bool, context [B, k]) -> [B, n, 3+F]``, zero at
    padded slots. Padded atoms and ``i == j`` pairs are masked out of messages, coordinate
    updates and the centre of mass, so the real rows equal ``egnn(x_ragged, t, batch)``.
    """

    def __init__(self, egnn: EGNN) -> None:
        super().__init__()
        self.egnn = egnn

    def forward(self, x: Tensor, t: Tensor, mask: Tensor, context: Optional[Tensor] = None) -> Tensor:
        net, (b, n, c) = self.egnn, x.shape
        t = t.to(x.dtype).reshape(-1)
        slot_mol = torch.arange(b, device=x.device).repeat_interleave(n)  # [B * n] molecule of every slot
        h = net.embed(net._node_inputs(x[..., 3:].reshape(b * n, c - 3), t, slot_mol, context)).reshape(
            b, n, -1
        )  # [B, n, H]
        real = mask.to(x.dtype)  # [B, n]
        off_diag = 1.0 - torch.eye(n, device=x.device, dtype=x.dtype)  # [n, n]
        pair = (real[:, :, None] * real[:, None, :] * off_diag)[..., None]  # [B, n, n, 1]
        pos0 = x[..., :3]  # [B, n, 3]
        diff0 = pos0[:, :, None, :] - pos0[:, None, :, :]  # [B, n, n, 3]
        d0 = (diff0 * diff0).sum(-1, keepdim=True)  # [B, n, n, 1]
        pos = pos0
        for block in net.blocks:
            h, pos = _block_dense(block, h, pos, d0, pair)
        vel = (pos - pos0) * real[..., None]  # [B, n, 3]
        mean = vel.sum(1, keepdim=True) / real.sum(1).clamp(min=1)[:, None, None]  # [B, 1, 3] over real atoms
        return torch.cat([vel - mean, net.out(h)], dim=-1) * real[..., None]  # [B, n, 3+F]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, device, warmup: int, reps: int) -> float:
    """Mean seconds per call of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync(device)
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
    print(
        f"train fwd+bwd, {args.batch} molecules ({int(sizes.sum())} atoms, 9-29 each), "
        f"hidden {args.hidden}, {args.layers} layers, {device}"
    )
    print(
        f"  polydiff EGNN   {args.batch / s_ours:9.1f} molecules/s  "
        f"({s_ours * 1e3:8.1f} ms/batch, {n_params(ours) / 1e6:.2f}M params)"
    )
    print(
        f"  egnn-pytorch    {args.batch / s_theirs:9.1f} molecules/s  "
        f"({s_theirs * 1e3:8.1f} ms/batch, {n_params(theirs) / 1e6:.2f}M params)"
    )
    print(f"  ratio           {s_theirs / s_ours:9.2f}x")
    return {
        "batch": args.batch,
        "atoms": int(sizes.sum()),
        "hidden": args.hidden,
        "layers": args.layers,
        "polydiff_molecules_per_s": args.batch / s_ours,
        "egnn_pytorch_molecules_per_s": args.batch / s_theirs,
        "polydiff_params": n_params(ours),
        "egnn_pytorch_params": n_params(theirs),
        "ratio_polydiff_over_egnn_pytorch": s_theirs / s_ours,
    }


def _time_alternating(
    fns: dict[str, Callable[[], None]], device: torch.device, warmup: int, reps: int
) -> dict[str, float]:
    """Median seconds per call of each ``fn``; calls alternate, in reversed order every other repetition."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(reps):
        for name in list(fns) if r % 2 == 0 else list(fns)[::-1]:
            _sync(device)
            t0 = time.perf_counter()
            fns[name]()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def _layout_problem(hidden: int, layers: int, b: int, device: torch.device) -> tuple[EGNN, tuple]:
    """A seeded EGNN and QM9-sized batch ``(x [N, 3+F], t [B], batch [N], sizes [B])``."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # manual_seed seeds CUDA too
        torch.manual_seed(0)
        net = EGNN(F, hidden=hidden, layers=layers).to(device)
    x, batch, sizes, _ = qm9_like_batch(b, device)
    t = torch.rand(b, generator=torch.Generator().manual_seed(1)).to(device)
    return net, (x, t, batch, sizes)


def _layout_steps(net: EGNN, x: Tensor, t: Tensor, batch: Tensor, sizes: Tensor) -> dict[str, Callable[[], None]]:
    """One forward + backward of the same loss (mean squared eps over real atoms) in each layout."""
    dense_net = DenseEGNN(net)
    xd, mask = _dense(x, batch, sizes)  # [B, n_max, 3+F], [B, n_max]; padding is the data loader's job

    def edge() -> None:
        net.zero_grad(set_to_none=True)
        net(x, t, batch).square().mean().backward()

    def dense() -> None:
        net.zero_grad(set_to_none=True)
        (dense_net(xd, t, mask).square().sum() / x.numel()).backward()  # padded outputs are 0

    return {"edge list": edge, "dense": dense}


def layout_agreement(net: EGNN, x: Tensor, t: Tensor, batch: Tensor, sizes: Tensor) -> dict[str, float]:
    """Largest ``|dense - edge list|`` of the eps (coordinates, features) and of the loss's parameter gradients."""
    xd, mask = _dense(x, batch, sizes)
    params = list(net.parameters())
    out_e = net(x, t, batch)  # [N, 3+F]
    out_d = _unpad(DenseEGNN(net)(xd, t, mask), batch, sizes)  # [N, 3+F]
    g_e = torch.autograd.grad(out_e.square().mean(), params)
    g_d = torch.autograd.grad(out_d.square().mean(), params)
    return {
        "max_abs_diff_coords": (out_d[:, :3] - out_e[:, :3]).abs().max().item(),
        "max_abs_diff_features": (out_d[:, 3:] - out_e[:, 3:]).abs().max().item(),
        "max_abs_coords": out_e[:, :3].abs().max().item(),
        "max_abs_features": out_e[:, 3:].abs().max().item(),
        "max_rel_diff_grads": max(
            ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item() for a, b in zip(g_d, g_e)
        ),
    }


def _saved_mib(forward: Callable[[], Tensor]) -> float:
    """MiB of the distinct storages autograd saves for backward in one forward (activation memory, whatever the
    allocator)."""
    sizes: dict[int, int] = {}

    def pack(x: Tensor) -> Tensor:
        storage = x.untyped_storage()
        sizes[storage.data_ptr()] = storage.nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        forward()
    return sum(sizes.values()) / 2**20


def _layout_peak(spec: dict[str, Any]) -> dict[str, float]:
    """Peak memory (MiB) of one layout's forward + backward after a warm-up step, above its start."""
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    net, data = _layout_problem(spec["hidden"], spec["layers"], spec["batch"], device)
    step = _layout_steps(net, *data)[spec["layout"]]
    step()  # one-time costs (library pages, thread pools) are not the layout's
    _sync(device)
    release_free_heap()  # else the measured step reuses what the warm-up freed and shows no growth
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    rss0 = reset_peak_rss()
    step()
    _sync(device)
    if device.type == "cuda":
        return {"peak_mib": (torch.cuda.max_memory_allocated() - base) / 2**20}
    return {"peak_mib": (peak_rss_kib() - rss0) / 1024}


def _layout_memory(spec: dict[str, Any]) -> float:
    """Peak memory (MiB) of ``spec['layout']``'s step, measured in a spawned process (NaN if it failed)."""
    result = run_isolated(_layout_peak, spec)
    if "error" in result:
        print(f"  peak memory of the {spec['layout']} layout not measured: {result['error']}")
        return float("nan")
    return result["peak_mib"]


def layout_comparison(args, device) -> dict:
    """Edge list vs. dense ``[B, n_max, n_max]`` with masks: same weights, agreement, molecules/s, peak memory."""
    net, (x, t, batch, sizes) = _layout_problem(args.hidden, args.layers, args.batch, device)
    agree = layout_agreement(net, x, t, batch, sizes)
    secs = _time_alternating(_layout_steps(net, x, t, batch, sizes), device, args.warmup, args.reps)
    spec = {
        "hidden": args.hidden,
        "layers": args.layers,
        "batch": args.batch,
        "device": str(device),
        "threads": torch.get_num_threads(),
    }
    mem = {k: _layout_memory({**spec, "layout": k}) for k in secs}
    xd, mask = _dense(x, batch, sizes)
    saved = {
        "edge list": _saved_mib(lambda: net(x, t, batch)),
        "dense": _saved_mib(lambda: DenseEGNN(net)(xd, t, mask)),
    }
    pairs_edge = int((sizes * (sizes - 1)).sum())
    pairs_dense = args.batch * int(sizes.max()) ** 2
    mem_note = "CUDA allocator peak above the step's start" if device.type == "cuda" else "growth of peak RSS"
    mem_note += ", one warm step in a fresh process"
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    print(
        f"layout, fwd+bwd, {args.batch} molecules ({int(sizes.sum())} atoms, 9-29 each), hidden {args.hidden}, "
        f"{args.layers} layers, {device}{threads}; same weights"
    )
    print(f"  pair MLP rows: edge list {pairs_edge}, dense {pairs_dense} ({pairs_dense / pairs_edge:.2f}x)")
    print(
        f"  dense vs edge list, max |diff|: eps coords {agree['max_abs_diff_coords']:.1e} "
        f"(of max {agree['max_abs_coords']:.1e}), "
        f"eps features {agree['max_abs_diff_features']:.1e} (of max {agree['max_abs_features']:.1e}), "
        f"parameter grads {agree['max_rel_diff_grads']:.1e} relative"
    )
    for k, s in secs.items():
        print(
            f"  {k:<15} {args.batch / s:9.1f} molecules/s  ({s * 1e3:8.1f} ms/batch, median of {args.reps}, "
            f"peak {mem[k]:7.1f} MiB, saved for backward {saved[k]:7.1f} MiB)"
        )
    ratio = secs["dense"] / secs["edge list"]
    print(f"  ratio edge/dense {ratio:8.2f}x molecules/s; peak memory: {mem_note}")
    return {
        "batch": args.batch,
        "atoms": int(sizes.sum()),
        "hidden": args.hidden,
        "layers": args.layers,
        "pairs_edge_list": pairs_edge,
        "pairs_dense": pairs_dense,
        **agree,
        "edge_list_molecules_per_s": args.batch / secs["edge list"],
        "dense_molecules_per_s": args.batch / secs["dense"],
        "edge_list_peak_mem_mib": mem["edge list"],
        "dense_peak_mem_mib": mem["dense"],
        "memory": mem_note,
        "edge_list_saved_for_backward_mib": saved["edge list"],
        "dense_saved_for_backward_mib": saved["dense"],
        "ratio_edge_over_dense": ratio,
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
        _sync(device)
        t0 = time.perf_counter()
        out = sample(name, den, x, schedule, run_steps, space=space, generator=gen)
        _sync(device)
        dt = (time.perf_counter() - t0) * steps / run_steps
        assert torch.isfinite(out).all()
        note = "" if run_steps == steps else f"  (extrapolated from {run_steps} steps)"
        print(f"  {name:9s} {steps:5d} steps  {args.sample_batch / dt:9.2f} molecules/s  {dt:8.2f} s/batch{note}")
        rows[f"{name}-{steps}"] = {"molecules_per_s": args.sample_batch / dt, "timed_steps": run_steps}
    return rows


def compile_cost(args, device) -> dict:
    """``torch.compile`` of the EGNN on ragged batches whose atom counts change every step: graphs and
    breaks traced, seconds until compilation settles, then compiled against eager forward + backward."""
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)
        net = EGNN(F, hidden=args.hidden, layers=args.layers).to(device)
    compiled = torch.compile(net)
    batches = [qm9_like_batch(args.batch, device, seed=k)[:2] for k in range(args.compile_batches + 2 * args.reps)]
    t = torch.rand(args.batch, generator=torch.Generator().manual_seed(1)).to(device)

    def step(model, x, b) -> None:
        model.zero_grad(set_to_none=True)
        model(x, t, b).square().mean().backward()

    t0 = time.perf_counter()
    for x, b in batches[: args.compile_batches]:  # shapes change: the first ones (re)compile
        step(compiled, x, b)
    _sync(device)
    settle = time.perf_counter() - t0
    counters = torch._dynamo.utils.counters
    graphs, breaks = int(counters["stats"]["unique_graphs"]), int(sum(counters["graph_break"].values()))
    step(net, *batches[0])  # eager's warm-up (its kernels' first launches), as the batches above were compiled's
    _sync(device)
    timed = {}
    for name, model in (("compiled", compiled), ("eager", net)):
        t0 = time.perf_counter()
        for x, b in batches[args.compile_batches :]:
            step(model, x, b)
        _sync(device)
        timed[name] = (time.perf_counter() - t0) / (2 * args.reps)
    ratio = timed["eager"] / timed["compiled"]
    print(
        f"EGNN torch.compile ({args.layers} layers, width {args.hidden}, {args.batch} molecules of 9-29 atoms, "
        f"{device}): {graphs} graphs, {breaks} graph breaks; {settle:.1f} s over the first {args.compile_batches} "
        f"batches; then {timed['compiled'] * 1e3:.1f} ms compiled vs {timed['eager'] * 1e3:.1f} ms eager a step "
        f"(eager/compiled {ratio:.2f})"
    )
    return {
        "unique_graphs": graphs,
        "graph_breaks": breaks,
        "settle_s": settle,
        "step_s_compiled": timed["compiled"],
        "step_s_eager": timed["eager"],
        "eager_over_compiled": ratio,
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--quick", action="store_true", help="CPU-sized run: small model, few repetitions, truncated samplers"
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--hidden", type=int, default=None, help="width (default 256, --quick 64)")
    p.add_argument("--layers", type=int, default=None, help="depth (default 9, --quick 4)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument(
        "--sample-batch", type=int, default=None, help="molecules per sampling batch (default 256, --quick 64)"
    )
    p.add_argument("--skip-sampling", action="store_true")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default 10, --quick 3)")
    p.add_argument("--skip-layout", action="store_true", help="leave out the edge-list vs. dense layout comparison")
    p.add_argument("--only", choices=SECTIONS, default=None, help="run this section alone (compile runs only so)")
    p.add_argument("--compile-batches", type=int, default=8, help="compile section: batches timed as warm-up")
    p.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = p.parse_args(argv)
    args.hidden = args.hidden or (64 if args.quick else 256)
    args.layers = args.layers or (4 if args.quick else 9)
    args.sample_batch = args.sample_batch or (64 if args.quick else 256)
    args.warmup, reps = (1, 3) if args.quick else (3, 10)
    args.reps = args.reps or reps
    args.max_sampler_steps = 10 if args.quick else 10_000
    device = torch.device(args.device)
    if device.type == "cpu" and args.quick:
        torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    runners = {
        "train": train_throughput,
        "layout": layout_comparison,
        "sampling": sampling_throughput,
        "compile": compile_cost,
    }
    skipped = {"layout": args.skip_layout, "sampling": args.skip_sampling, "compile": True}  # minutes of compiling
    sections = [args.only] if args.only else [k for k in SECTIONS if not skipped.get(k)]
    result: dict[str, Any] = {"device": str(device)}
    for name in sections:
        result[name] = runners[name](args, device)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
