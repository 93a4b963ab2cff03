"""Training throughput and peak memory of polydiff's U-Net against two reference implementations.

(a) ``UNet(dims=1)`` vs ``denoising_diffusion_pytorch.Unet1D`` on mono waveforms (default 16 x 16,000),
(b) ``UNet(dims=2)`` vs ``diffusers.UNet2DModel`` (DDPM CIFAR-10 layout) on images (default 32 x 3 x 32 x 32).

Our width (``channels``) is searched so that the parameter counts match within a few percent.
Each model is timed in its own fresh process (median step time of forward + backward + AdamW
after warm-up), so the peak memory of one does not hide the other's. Peak memory is
``torch.cuda.max_memory_allocated`` on CUDA; on CPU it is the growth of the process's peak
resident set size (Linux ``VmHWM``, reset just before training) over the training steps:
activations, gradients and optimizer state on top of the model.

    python benchmarks/bench_unet.py --quick            # ~1-2 minutes on 2 CPU cores
    python benchmarks/bench_unet.py --device cuda --bf16 --compile --out unet_bench.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.memory import peak_rss_kib, reset_peak_rss, run_isolated  # noqa: E402
from domains.unet import UNet  # noqa: E402


def _count(build) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in build().parameters())


def _theirs_1d(dim: int):
    from denoising_diffusion_pytorch import Unet1D

    return lambda: Unet1D(dim, dim_mults=(1, 2, 4, 8), channels=1)


def _theirs_2d(width: int, in_channels: int, size: int):
    from diffusers import UNet2DModel

    # The DDPM CIFAR-10 layout (Ho et al. 2020, appendix B): attention at the 16x16 level only.
    return lambda: UNet2DModel(
        sample_size=size,
        in_channels=in_channels,
        out_channels=in_channels,
        block_out_channels=(width, 2 * width, 2 * width, 2 * width),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=2,
        attention_head_dim=width // 2,  # 4 heads at the attention level, like ours
        norm_num_groups=min(32, width),
    )


def _ours(dims: int, in_channels: int, channels: int, down_factor: int):
    if dims == 1:
        cfg = dict(channel_mults=(1, 2, 4, 8), down_factors=down_factor, attention_levels=())
    else:
        cfg = dict(channel_mults=(1, 2, 2, 2), down_factors=2, attention_levels=(1,))
    return lambda: UNet(dims, in_channels, channels=channels, num_res_blocks=2, mid_attention=True, num_heads=4, **cfg)


def _match_width(dims: int, in_channels: int, target: int, down_factor: int) -> int:
    """Our even width whose parameter count is nearest to ``target`` (the count grows with width)."""
    count = lambda c: _count(_ours(dims, in_channels, c, down_factor))  # noqa: E731
    lo, hi = 2, 2048  # bisect for the smallest even width with count >= target
    while lo < hi:
        mid = (lo + hi) // 4 * 2
        lo, hi = (mid + 2, hi) if count(mid) < target else (lo, mid)
    below = max(lo - 2, 2)
    return lo if abs(count(lo) - target) <= abs(count(below) - target) else below


def _measure(spec: dict[str, Any]) -> dict[str, Any]:
    if spec["threads"] > 0:
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    torch.manual_seed(0)
    kind, shape = spec["kind"], spec["shape"]
    if kind == "ours":
        net = _ours(spec["dims"], shape[1], spec["width"], spec["down_factor"])()
        call = lambda x, t: net(x, t)  # noqa: E731
    elif kind == "lucidrains":
        net = _theirs_1d(spec["width"])()
        call = lambda x, t: net(x, t * 1000)  # noqa: E731
    else:
        net = _theirs_2d(spec["width"], shape[1], shape[-1])()
        call = lambda x, t: net(x, t * 1000).sample  # noqa: E731
    net = net.to(device).train()
    params = sum(p.numel() for p in net.parameters())
    if spec["compile"]:
        net = torch.compile(net, backend=spec.get("compile_backend", "inductor"))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    x = torch.randn(shape, device=device)
    noise = torch.randn(shape, device=device)
    t = torch.rand(shape[0], device=device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec["bf16"])

    def step() -> None:
        with amp:
            out = call(x, t)
        loss = F.mse_loss(out.float(), noise)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss0 = reset_peak_rss()
    t0 = time.perf_counter()
    for _ in range(spec["warmup"]):
        step()
    sync()
    warm_s = time.perf_counter() - t0
    times = []  # per-step times; the median resists other processes sharing the machine
    for _ in range(spec["steps"]):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    median = sorted(times)[len(times) // 2]
    if device.type == "cuda":
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mib = (peak_rss_kib() - rss0) / 1024
    return {
        "params": params,
        "samples_per_s": shape[0] / median,
        "step_ms": 1000 * median,
        "step_ms_all": [1000 * x for x in times],
        "warmup_s": warm_s,
        "peak_mem_mib": peak_mib,
    }


def _run(spec: dict[str, Any]) -> dict[str, Any]:
    """Time one model in a fresh process (its peak memory is its own)."""
    return run_isolated(_measure, spec)


def _compare(name: str, ours: dict, theirs: dict, theirs_name: str) -> dict[str, Any]:
    row = {"ours": ours, theirs_name: theirs}
    if "error" not in ours and "error" not in theirs:
        row["ratio_ours_over_theirs"] = {
            k: ours[k] / theirs[k] for k in ("params", "samples_per_s", "peak_mem_mib") if theirs[k] > 0
        }
    print(f"\n== {name} ==")
    print(f"{'model':<12} {'params':>12} {'samples/s':>11} {'step ms':>9} {'peak MiB':>10}")
    for label, r in (("ours", ours), (theirs_name, theirs)):
        if "error" in r:
            print(f"{label:<12} failed: {r['error']}")
        else:
            print(
                f"{label:<12} {r['params']:>12,} {r['samples_per_s']:>11.2f} {r['step_ms']:>9.1f} "
                f"{r['peak_mem_mib']:>10.1f}"
            )
    if "ratio_ours_over_theirs" in row:
        ratio = row["ratio_ours_over_theirs"]
        print("ours/theirs  " + "  ".join(f"{k}={v:.2f}" for k, v in ratio.items()))
    return row


def _save_partial(out: Path | None, report: dict[str, Any], key: str, row: dict[str, Any]) -> None:
    """With ``--out``, write the report so far (``key``'s row holding our model alone), so that a run
    stopped while the peer is measured (a time limit) keeps our figure; the end of the run rewrites it."""
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(
            json.dumps({**report, "results": {**report["results"], key: {**row, "partial": True}}}, indent=2)
        )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto = cuda if available")
    ap.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the forward pass")
    ap.add_argument("--compile", action="store_true", help="torch.compile every model (warm-up includes compilation)")
    ap.add_argument(
        "--compile-backend",
        default="inductor",
        help="torch.compile backend with --compile (default inductor; aot_eager traces without code generation)",
    )
    ap.add_argument("--batch", type=int, default=None, help="1-D batch size (default 16; 2 with --quick)")
    ap.add_argument("--length", type=int, default=None, help="1-D samples per clip (default 16000; 2048 with --quick)")
    ap.add_argument("--batch-2d", type=int, default=None, help="2-D batch size (default 32; 8 with --quick)")
    ap.add_argument("--size", type=int, default=None, help="2-D image side (default 32; 16 with --quick)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 20; 3 with --quick)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5; 1 with --quick)")
    ap.add_argument("--dim-1d", type=int, default=None, help="Unet1D `dim` (default 64; 16 with --quick)")
    ap.add_argument("--width-2d", type=int, default=None, help="UNet2DModel base width (default 128; 32 with --quick)")
    ap.add_argument("--down-factor", type=int, default=2, help="our 1-D down-sampling factor per level (Unet1D uses 2)")
    ap.add_argument("--only", choices=("1d", "2d", "both"), default="both")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    ap.add_argument("--quick", action="store_true", help="small sizes: a 1-2 minute run on 2 CPU cores")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)

    q = args.quick
    pick = lambda v, full, quick: v if v is not None else (quick if q else full)  # noqa: E731
    batch, length = pick(args.batch, 16, 2), pick(args.length, 16000, 2048)
    batch2d, size = pick(args.batch_2d, 32, 8), pick(args.size, 32, 16)
    steps, warmup = pick(args.steps, 20, 3), pick(args.warmup, 5, 1)
    dim1d, width2d = pick(args.dim_1d, 64, 16), pick(args.width_2d, 128, 32)
    if args.device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is visible to torch; use --device cpu")
    else:
        device = args.device
    if length % 8:
        ap.error(f"--length {length}: Unet1D needs a multiple of 8 (ours takes any length)")

    common = dict(device=device, bf16=args.bf16, compile=args.compile, steps=steps, warmup=warmup, threads=args.threads)
    if args.compile and args.compile_backend != "inductor":
        common["compile_backend"] = args.compile_backend
    mem_note = (
        "torch.cuda.max_memory_allocated" if device == "cuda" else "growth of peak RSS (VmHWM) over the training steps"
    )
    print(
        f"device={device} bf16={args.bf16} compile={args.compile} steps={steps} warmup={warmup} "
        f"torch={torch.__version__}"
    )
    print(f"peak memory = {mem_note}")
    report: dict[str, Any] = {
        "device": device if device == "cpu" else torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "settings": {**common, "memory": mem_note},
        "results": {},
    }

    if args.only in ("1d", "both"):
        target = _count(_theirs_1d(dim1d))
        width = _match_width(1, 1, target, args.down_factor)
        shape = (batch, 1, length)
        print(
            f"\n1-D: batch {shape}; Unet1D(dim={dim1d}) vs "
            f"UNet(dims=1, channels={width}, down_factors={args.down_factor})"
        )
        config = {"shape": shape, "ours_channels": width, "ours_down_factor": args.down_factor, "unet1d_dim": dim1d}
        ours = _run(
            {**common, "kind": "ours", "dims": 1, "width": width, "down_factor": args.down_factor, "shape": shape}
        )
        _save_partial(args.out, report, "1d", {"ours": ours, "config": config})
        theirs = _run({**common, "kind": "lucidrains", "width": dim1d, "shape": shape})
        row = _compare("1-D: ours vs denoising_diffusion_pytorch.Unet1D", ours, theirs, "lucidrains")
        row["config"] = config
        report["results"]["1d"] = row

    if args.only in ("2d", "both"):
        target = _count(_theirs_2d(width2d, 3, size))
        width = _match_width(2, 3, target, 2)
        shape = (batch2d, 3, size, size)
        print(f"\n2-D: batch {shape}; UNet2DModel(width={width2d}) vs UNet(dims=2, channels={width})")
        config = {"shape": shape, "ours_channels": width, "unet2d_width": width2d}
        ours = _run({**common, "kind": "ours", "dims": 2, "width": width, "down_factor": 2, "shape": shape})
        _save_partial(args.out, report, "2d", {"ours": ours, "config": config})
        theirs = _run({**common, "kind": "diffusers", "width": width2d, "shape": shape})
        row = _compare("2-D: ours vs diffusers.UNet2DModel", ours, theirs, "diffusers")
        row["config"] = config
        report["results"]["2d"] = row

    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
        print(f"\nwrote {args.out}")
    return report


if __name__ == "__main__":
    main()
