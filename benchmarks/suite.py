"""``polydiff bench``: train each domain for a fixed budget, then sweep samplers, steps and guidance.

For every domain: training throughput and peak memory, the loss curve, and for each sampler
configuration the domain's quality metrics, wall time, samples per second and peak memory,
next to the reference row of real data. Peers (diffusers' schedulers, lucidrains' Unet1D,
egnn-pytorch, diffusers' UNet2DModel) are measured side by side in the same run.
Results: ``benchmarks/results/<date>_<suite>_<device>.json``, a Markdown table and PNG plots.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from benchmarks.memory import peak_rss_kib, release_free_heap, reset_peak_rss
from polydiff.build import resolve_device, to_plain
from polydiff.config import check_overrides, merge_sampler, retarget_plugins
from polydiff.domain import Batch
from polydiff.generate import generate
from polydiff.latent import LatentDomain, reconstruction_row
from polydiff.recipes import compose_recipe
from polydiff.samplers import network_calls
from polydiff.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path("benchmarks") / "results"  # below the working directory (the repository's own folder when run there)
# A sweep's step count that stands for the recipe's own schedule.steps: DDPM at the training T, whatever
# a --recipe domain or a --set schedule.steps=... makes it (a fixed 1000 would fail on a shorter schedule).
TRAINING_T = "T"
SamplerRow = tuple  # (name, steps) or (name, steps, {option: value})

# EDM's stochastic Heun (Karras et al. 2022, Alg. 2 with its ImageNet-64 S_churn, S_tmin, S_tmax): noise raised by
# up to sqrt(2) - 1 before each step between sigma 0.05 and 50, at no extra network calls.
CHURN = {"s_churn": 40, "s_tmin": 0.05, "s_tmax": 50}


def sampler_label(name: str, options: Optional[dict[str, Any]] = None) -> str:
    """A row's sampler column: the name, and the options it was given (``heun s_churn=40 s_tmin=0.05 s_tmax=50``)."""
    return " ".join([name, *(f"{k}={v}" for k, v in (options or {}).items())])


@dataclass
class DomainBench:
    """How one domain is benchmarked: its recipe, overrides and sweep."""

    recipe: str
    overrides: list[str]
    num_samples: int
    # (name, steps) or (name, steps, options); steps TRAINING_T: the recipe's schedule.steps; options: the sampler's
    # keyword arguments (EDM's churn), named in the row's label
    samplers: list[SamplerRow]
    guidance: list[float] = field(default_factory=lambda: [1.0])
    batch_sizes: list[int] = field(default_factory=lambda: [8, 16, 32])
    peers: list[str] = field(default_factory=list)
    # Guided sampling costs two network calls a step: skip it above this many steps.
    max_guided_steps: int = 10**9
    # Throughput against the size of one sample: a prior option and its values, e.g. ("duration",
    # seconds) for audio, ("num_atoms", counts) for molecules (the fully connected EGNN is quadratic).
    scaling: Optional[tuple[str, list[float]]] = None
    # A data set the user places locally (``--data NAME=PATH``): its name, the recipe key that takes
    # the path, and where the copy goes. Without it the domain is skipped with that message.
    data: Optional[tuple[str, str, str]] = None
    # Also time training under torch.compile against eager on one batch (full suite): where it helps.
    compile_check: bool = False
    # Other objectives trained on the same budget, each with its own sweep: (name, overrides, [(sampler, steps)]).
    objectives: list[tuple[str, list[str], list[SamplerRow]]] = field(default_factory=list)


def _train_steps(steps: int) -> list[str]:
    # No checkpoint, snapshot (the GPU recipes' keep_every) or draw among the timed steps: fit() writes
    # last.pt once after them, and the sweep samples itself.
    return [
        f"trainer.max_steps={steps}",
        f"trainer.ckpt_every={steps + 1}",
        "trainer.keep_every=0",
        "trainer.sample_every=0",
        f"trainer.log_every={max(1, steps // 20)}",
        "trainer.progress=false",
    ]


QM9_HELP = "gdb9.sdf, gdb9.sdf.csv and uncharacterized.txt in PATH/raw"
SC09_HELP = "speech_commands_v0.02 extracted to PATH/SpeechCommands/speech_commands_v0.02"


def packaged(key: str) -> bool:
    """Whether the data set ``key`` is installed as a package (QM9: qm9pack), so that it needs no ``--data``."""
    from domains.molecule.qm9 import qm9_package_dir

    return key == "qm9" and qm9_package_dir() is not None


def _placing(key: str, where: str) -> str:
    """How to give the data set ``key``: a local copy through ``--data``, or its package where there is one."""
    from domains.molecule.qm9 import QM9_PACKAGE

    package = f" (or pip install {QM9_PACKAGE} and give no --data)" if key == "qm9" else ""
    return f"place {where}, then pass --data {key}=PATH{package}"


def suites() -> dict[str, dict[str, DomainBench]]:
    """The quick (2 CPU cores) and full (one GPU) suites.

    Both hold ``audio_latent`` beside ``audio``: the latent recipe (the fixed mel stage unless ``--set
    latent.autoencoder=RUN``) on no more CPU than the waveform domain's training (quick: 8,000 latent steps against
    1,000 waveform ones; full: the same steps), its first stage's cost and reconstruction row reported apart
    (:func:`first_stage_cost`, :func:`polydiff.latent.reconstruction_row`).

    ``full`` adds the literature settings where the data are placed locally (or, for QM9, installed as the
    qm9pack package): ``qm9`` with EDM's
    model, schedule and optimiser (Hoogeboom et al. 2022: 82.0% molecule stability from DDPM-1000,
    10,000 samples) and ``sc09`` at 16 kHz (DiffWave, Kong et al. 2021: IS 5.30 vs 8.48 for real clips).
    """
    quick_samplers = [
        ("ddpm", TRAINING_T),
        ("ddim", 100),
        ("ddim", 50),
        ("ddim", 20),
        ("ddim", 10),
        ("dpmpp_2m", 20),
        ("dpmpp_2m", 10),
    ]
    full_samplers = list(quick_samplers)  # the same sweep
    # Latent audio on a CPU: the rows the waveform sweep shares (seconds of audio per second at equal steps), with
    # DDPM at T and the few-step solvers a latent model is meant for; every row decodes (Griffin-Lim for mel).
    latent_samplers = [("ddpm", TRAINING_T), ("ddim", 50), ("ddim", 20), ("dpmpp_2m", 20), ("dpmpp_2m", 10)]

    def continuous(
        sigma_data: float,
        p_mean: Optional[float] = None,
        weighting: str = "uniform",
        p_std: Optional[float] = None,
        precond: str = "edm",
    ) -> list[tuple[str, list[str], list[SamplerRow]]]:
        """The continuous-time family on the same budget: flow matching with Euler and Heun at about 10, 20 and 50
        network calls (Heun makes 2 steps - 1), EDM with Heun at its 35 (18 steps), ``sigma_data`` and, where given,
        the centre ``p_mean`` and spread ``p_std`` of its log-normal training noise (EDM's own -1.2 and 1.2
        otherwise); both with the adaptive probability-flow ODE solver (``ode``, steps 0: the network calls it
        chose) and with EDM's stochastic Heun (:data:`CHURN`) at the same network calls. ``sigma_data`` is the
        domain's training-state standard deviation (measured on 64-256 training samples) except where a measured
        sweep chose another (README, "Continuous time"). ``weighting`` is both objectives' loss weighting, given
        explicitly: a recipe's own (``min_snr`` in the image and audio recipes) would otherwise carry over.
        ``precond`` is what EDM's network predicts (``objective.precond``)."""
        weigh = f"objective.weighting={weighting}"
        edm = ["objective.name=edm", f"objective.sigma_data={sigma_data}", weigh, f"objective.precond={precond}"]
        edm += [f"objective.p_mean={p_mean}"] if p_mean is not None else []
        edm += [f"objective.p_std={p_std}"] if p_std is not None else []
        return [
            (
                "flow",
                ["objective.name=flow", weigh],
                [
                    ("euler", 10),
                    ("euler", 20),
                    ("euler", 50),
                    ("heun", 5),
                    ("heun", 10),
                    ("heun", 10, CHURN),
                    ("heun", 25),
                    ("ode", 0),
                ],
            ),
            ("edm", edm, [("heun", 18), ("heun", 18, CHURN), ("ode", 0)]),
        ]

    # Molecules: flow matching with each noise draw rotated and permuted onto its molecule as well (EquiFM).
    aligned = ("flow-aligned", ["objective.name=flow", "objective.coupling=aligned"], [("euler", 50), ("heun", 25)])

    return {
        "quick": {
            "points": DomainBench(
                "examples/points.yaml",
                _train_steps(1500),
                512,
                quick_samplers,
                batch_sizes=[64, 256, 1024],
                peers=["samplers", "diffusers"],
                objectives=continuous(1.0),  # the mixture's std 1.4 stalls EDM's loss at 1.0 (README)
            ),
            "image": DomainBench(
                "recipes/image_unet.yaml",
                ["profile=cpu", *_train_steps(1000)],
                100,
                quick_samplers,
                guidance=[1.0, 3.0],
                batch_sizes=[16, 32, 64],
                peers=["unet2d", "diffusers"],
                max_guided_steps=100,
                objectives=continuous(0.5, -0.8),  # EDM's sigma_data for images (the digits' std: 0.76); README
            ),
            "audio": DomainBench(
                "recipes/audio_unet.yaml",
                ["profile=cpu", *_train_steps(1000)],
                30,
                [("ddpm", TRAINING_T), ("ddpm", 200), *quick_samplers[1:]],
                guidance=[1.0, 3.0],
                batch_sizes=[4, 8, 16],
                peers=["unet1d", "diffusers"],
                scaling=("duration", [0.35, 0.7, 1.4, 2.8]),
                max_guided_steps=100,
                objectives=continuous(0.12),
            ),
            # The fixed mel stage's latents (16 kHz, 1 s clips: 64 bands x 63 frames) on no more CPU than the
            # waveform domain: a latent step costs about a fifteenth of a waveform one (one thread: 8,000 latent
            # steps take about 10 minutes, 1,000 waveform steps about 20), so it takes the CPU profile's 8,000 steps.
            # --set latent.autoencoder=RUN swaps in a trained first stage. Its rows carry the first stage's cost
            # apart (``first_stage``) and its reconstruction row beside the real data's.
            "audio_latent": DomainBench(
                "recipes/audio_latent.yaml",
                ["profile=cpu", "latent.autoencoder=mel", *_train_steps(8000)],
                30,
                latent_samplers,
                guidance=[1.0, 3.0],
                batch_sizes=[4, 8, 16],
                peers=["diffusers"],
                max_guided_steps=100,
                # Unit-std latents; the recipe's min-SNR-5, about its cosine schedule's spread of ln sigma (pi / 2)
                # and its x0 target: EDM 19 against 181 with its own weight, noise and F; flow + churn 40 against 52
                # with min-SNR (README).
                objectives=continuous(1.0, 0.0, "min_snr", 1.6, "x0"),
            ),
            "molecule": DomainBench(
                "recipes/molecule_egnn.yaml",
                ["profile=cpu", *_train_steps(800)],
                64,
                quick_samplers,
                batch_sizes=[8, 16, 32],
                peers=["egnn"],
                scaling=("num_atoms", [8, 16, 32, 64]),
                objectives=[*continuous(0.84), aligned],
            ),
        },
        "full": {
            "points": DomainBench(
                "examples/points.yaml",
                _train_steps(5000),
                4096,
                full_samplers,
                batch_sizes=[256, 1024, 4096],
                peers=["samplers", "diffusers"],
                objectives=continuous(1.0),  # the mixture's std 1.4 stalls EDM's loss at 1.0 (README)
            ),
            "image": DomainBench(
                "recipes/image_unet.yaml",
                _train_steps(20000),
                300,
                full_samplers,
                guidance=[1.0, 3.0],
                batch_sizes=[32, 64, 128, 256],
                peers=["unet2d", "diffusers"],
                compile_check=True,
                objectives=continuous(0.5),  # EDM's own p_mean: the quick suite's -0.8 was chosen at 1,000 steps
            ),
            # 100 samples: as many as the built-in set's held-out clips, so FID's sample-count bias is the
            # reference row's.
            "audio": DomainBench(
                "recipes/audio_unet.yaml",
                _train_steps(20000),
                100,
                [("ddpm", 200), *full_samplers],
                guidance=[1.0, 3.0],
                batch_sizes=[4, 8, 16, 32],
                peers=["unet1d", "diffusers"],
                scaling=("duration", [0.5, 1.0, 2.0, 4.0]),
                compile_check=True,
                objectives=continuous(0.12),
            ),
            "audio_latent": DomainBench(
                "recipes/audio_latent.yaml",
                ["latent.autoencoder=mel", *_train_steps(20000)],
                100,
                [("ddpm", 200), *full_samplers],
                guidance=[1.0, 3.0],
                batch_sizes=[4, 8, 16, 32],
                peers=["diffusers"],
                compile_check=True,
                objectives=continuous(1.0, 0.0, "min_snr", 1.6, "x0"),  # as the quick suite's
            ),
            "molecule": DomainBench(
                "recipes/molecule_egnn.yaml",
                _train_steps(20000),
                1000,
                full_samplers,
                batch_sizes=[16, 32, 64, 128],
                peers=["egnn"],
                scaling=("num_atoms", [8, 16, 32, 64]),
                compile_check=True,
                objectives=[*continuous(0.84), aligned],
            ),
            # The recipe's defaults already are EDM's (9 layers, 256 wide, polynomial T = 1000, batch 64,
            # lr 1e-4, EMA 0.9999); EDM trained ~4.7M steps, so raise --steps to chase its 82% figure.
            "qm9": DomainBench(
                "recipes/molecule_egnn.yaml",
                ["domain.source=qm9", *_train_steps(200000)],
                10000,
                [("ddpm", 1000), ("ddim", 100), ("ddim", 50), ("dpmpp_2m", 100), ("dpmpp_2m", 50), ("dpmpp_2m", 20)],
                batch_sizes=[64, 128, 256],
                scaling=("num_atoms", [9, 18, 29, 58]),
                data=("qm9", "domain.path", QM9_HELP),
                compile_check=True,
            ),
            # SC09 at 16 kHz, the recipe's GPU model; DiffWave and SaShiMi score 2,048 samples.
            "sc09": DomainBench(
                "recipes/audio_unet.yaml",
                ["domain.dataset=sc09", "trainer.batch_size=64", *_train_steps(200000)],
                2048,
                [("ddpm", 200), ("ddim", 100), ("ddim", 50), ("dpmpp_2m", 50), ("dpmpp_2m", 20)],
                guidance=[1.0, 2.0, 3.0],
                batch_sizes=[16, 32, 64],
                peers=["diffusers"],
                data=("sc09", "domain.root", SC09_HELP),
                compile_check=True,
            ),
        },
    }


# ---------------------------------------------------------------------------------- measurement
class PeakMemory:
    """Peak memory of a phase: CUDA's allocator peak above the phase's start, or on a CPU the
    process's peak resident set during the phase (Linux ``VmHWM``, reset when the phase starts).

    The CPU figure includes what the process already holds (libraries, model, data), though not the
    free pages an earlier phase left in the C heap (returned to the OS first); growth over the start
    would read zero whenever the allocator reuses memory freed by an earlier phase.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_mb = 0.0

    @contextmanager
    def measure(self) -> Iterator["PeakMemory"]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
            yield self
            torch.cuda.synchronize(self.device)
            self.peak_mb = (torch.cuda.max_memory_allocated(self.device) - base) / 2**20
            return
        release_free_heap()  # else the heap's free pages, an earlier phase's, count in this phase's peak
        reset_peak_rss()
        try:
            yield self
        finally:
            self.peak_mb = peak_rss_kib() / 1024


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_training(trainer: Trainer, batch, repeats: int, net: Optional[torch.nn.Module] = None) -> dict[str, float]:
    """Samples/s and peak memory of forward + backward + AdamW on one batch (after a timed warm-up step)."""
    net = trainer.net if net is None else net
    opt = torch.optim.AdamW(net.parameters(), lr=1e-6)
    net.train()
    objective, schedule = trainer.parts.objective, trainer.parts.schedule

    def step() -> None:
        with trainer.autocast():
            loss = objective.loss(net, batch, schedule, trainer.generator)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    _sync(trainer.device)
    t0 = time.perf_counter()
    step()  # warm-up: kernels, caches and, for a compiled network, compilation
    _sync(trainer.device)
    warmup = time.perf_counter() - t0
    mem = PeakMemory(trainer.device)
    with mem.measure():
        _sync(trainer.device)
        t0 = time.perf_counter()
        for _ in range(repeats):
            step()
        _sync(trainer.device)
        dt = (time.perf_counter() - t0) / repeats
    return {"samples_per_s": batch.num_samples / dt, "peak_mem_mb": mem.peak_mb, "warmup_s": warmup}


def _train_batch(trainer: Trainer, batch_size: int) -> Batch:
    """``batch_size`` real training items (fewer if the set is smaller), the same for a given size."""
    n = min(batch_size, len(trainer.train_set))
    idx = torch.randperm(len(trainer.train_set), generator=torch.Generator().manual_seed(batch_size))[:n].tolist()
    return trainer.domain.collate([trainer.train_set[i] for i in idx]).to(trainer.device)


def train_throughput(trainer: Trainer, batch_size: int, repeats: int = 3) -> dict[str, float]:
    """Training throughput on real training items at ``batch_size``."""
    batch = _train_batch(trainer, batch_size)
    return {"batch_size": batch.num_samples, **_time_training(trainer, batch, repeats)}


def compile_speedup(trainer: Trainer, batch_size: int, repeats: int = 3) -> dict[str, float]:
    """Training samples/s eagerly and under ``torch.compile`` on the same batch, and the compile time.

    One fixed batch: ragged domains (molecules) change shape every real step, so their compiled
    figure is an upper bound unless dynamic shapes settle.
    """
    batch = _train_batch(trainer, batch_size)
    eager = _time_training(trainer, batch, repeats)
    compiled = _time_training(trainer, batch, repeats, net=torch.compile(trainer.net))
    return {
        "batch_size": batch.num_samples,
        "eager_samples_per_s": eager["samples_per_s"],
        "compiled_samples_per_s": compiled["samples_per_s"],
        "ratio_compiled_over_eager": compiled["samples_per_s"] / eager["samples_per_s"],
        "compile_s": compiled["warmup_s"] - eager["warmup_s"],
        "eager_peak_mem_mb": eager["peak_mem_mb"],
        "compiled_peak_mem_mb": compiled["peak_mem_mb"],
    }


def size_throughput(trainer: Trainer, option: str, value: float, batch_size: int, repeats: int = 3) -> dict[str, float]:
    """Training throughput on states of another size: ``domain.prior(..., option=value)`` (noise as data)."""
    domain = trainer.domain
    g = torch.Generator(device=trainer.device).manual_seed(0)
    labels = (
        torch.randint(0, domain.num_classes, (batch_size,), device=trainer.device, generator=g)
        if domain.num_classes
        else None
    )
    space, cond = domain.prior(batch_size, labels=labels, device=trainer.device, generator=g, **{option: value})
    batch = Batch(space.randn(generator=g), space, cond)
    return {
        "axis": option,
        "size": value,
        "elements_per_sample": batch.x.numel() / batch_size,
        "batch_size": batch_size,
        **_time_training(trainer, batch, repeats),
    }


def sampler_row(
    trainer: Trainer,
    name: str,
    steps: int,
    scale: float,
    n: int,
    seed: int,
    objective: str = "vp",
    options: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """Sample ``n`` with the EMA weights (in the recipe's sampler.batch_size chunks); wall time,
    samples/s, peak memory, network calls per sample and the domain's metrics. ``steps`` 0: an adaptive solver
    (``ode``) that chooses its own, its network calls as it reports them (the mean over chunks). ``options``: the
    sampler's own, over the recipe's; the row's ``sampler`` names them (:func:`sampler_label`)."""
    domain = trainer.domain
    labels = domain.default_labels(n, trainer.device)
    # The recipe's sampler section with another sampler named: the options that sampler does not take are left out.
    sampler = merge_sampler(trainer.cfg["sampler"], {"name": name, "steps": max(steps, 1), **(options or {})})
    reported: list[int] = []  # an adaptive solver's network calls, one entry per chunk
    gen = torch.Generator(device=trainer.device).manual_seed(seed)
    mem = PeakMemory(trainer.device)
    with mem.measure():
        _sync(trainer.device)
        t0 = time.perf_counter()
        batch = generate(
            domain,
            trainer.ema.module,
            trainer.parts.schedule,
            trainer.parts.objective,
            n,
            sampler=sampler,
            guidance={"scale": scale},
            labels=labels,
            device=trainer.device,
            generator=gen,
            callback=lambda info: reported.append(int(info["nfe"])) if "nfe" in info else None,
        )
        _sync(trainer.device)
        sampled = time.perf_counter()
        decode = getattr(domain.outputs, "decoded", None)
        if decode is not None:  # a latent model: decoding (Griffin-Lim for mel) is part of a sample's cost
            decode(batch)  # kept for evaluate() below
            _sync(trainer.device)
        wall = time.perf_counter() - t0
    metrics = domain.evaluate(batch)
    row = {
        "objective": objective,
        "sampler": sampler_label(name, options),
        "steps": steps,
        "nfe": sum(reported) / len(reported) if reported else network_calls(name, steps),
        "guidance": scale,
        "num_samples": n,
        "wall_s": wall,
        "samples_per_s": n / wall,
        "peak_mem_mb": mem.peak_mb,
        "metrics": metrics,
    }
    if decode is not None:
        row["decode_s"] = t0 + wall - sampled  # of wall_s
    # Audio (a latent model's decoded clips too): seconds of audio generated per second, samples/s x clip duration.
    duration = getattr(getattr(domain, "inner", domain), "duration", None)
    if isinstance(duration, (int, float)):
        row["audio_seconds_per_s"] = n * duration / wall
    return row


TRAINED_SAMPLERS = [("ddpm", 100), ("ddim", 50), ("dpmpp_2m", 20)]


@torch.no_grad()
def diffusers_on_trained(trainer: Trainer, n: int, seed: int) -> dict[str, Any]:
    """diffusers' DDPM, DDIM and DPM-Solver++ schedulers driving the trained EMA network against
    polydiff's samplers, from the same noise and labels (no guidance; the recipe's x0 clipping):
    time, outputs and the domain's metrics of both."""
    from benchmarks.bench_samplers import compare_on_network
    from polydiff.space import DenseSpace

    domain, device = trainer.domain, trainer.device
    n = min(n, int(trainer.cfg["sampler"].get("batch_size") or n))
    g = torch.Generator(device=device).manual_seed(seed)
    labels = domain.default_labels(n, device)
    space, cond = domain.prior(n, labels=labels, device=device, generator=g)
    if not isinstance(space, DenseSpace):
        return {"skipped": "diffusers' schedulers know dense tensors only (no zero-centre-of-mass projection)"}
    if space.mask is not None:
        return {"skipped": "diffusers' schedulers know no masks: they would noise the padding polydiff keeps at zero"}
    noise = space.randn(generator=g)
    net = trainer.ema.module.eval()

    def raw(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return net(x, t.to(x.dtype), **cond)

    rows = compare_on_network(
        raw,
        trainer.parts.objective,
        trainer.parts.schedule,
        space,
        noise,
        TRAINED_SAMPLERS,
        seed,
        clip_x0=trainer.cfg["sampler"].get("clip_x0"),
    )
    out = {}
    for row in rows:
        ours, theirs = row.pop("x_polydiff"), row.pop("x_diffusers")
        row["metrics_polydiff"] = domain.evaluate(Batch(ours, space, cond))
        row["metrics_diffusers"] = domain.evaluate(Batch(theirs, space, cond))
        out[f"{row['sampler']}-{row['steps']}"] = row
    return {"num_samples": n, "samplers": out}


def run_peer(peer: str, device: torch.device, quick: bool) -> dict[str, Any]:
    """A peer comparison measured in this run; each returns ratios ours/theirs."""
    if peer == "samplers":
        from benchmarks.bench_samplers import run as run_samplers

        shape = (16, 1, 4000) if quick else (16, 1, 16000)
        return run_samplers(shape, 50, 3 if quick else 10, str(device))
    if peer in ("unet1d", "unet2d"):
        from benchmarks.bench_unet import main as bench_unet

        args = ["--only", peer[-2:], "--device", device.type] + (
            ["--quick"] if quick else ["--bf16"] * (device.type == "cuda")
        )
        return bench_unet(args)
    if peer == "egnn":
        from benchmarks.bench_egnn import main as bench_egnn

        threads = torch.get_num_threads()
        try:
            return bench_egnn(["--device", device.type] + (["--quick", "--skip-sampling"] if quick else []))
        finally:  # its --quick pins torch to 2 threads: not for the domains measured after it in this process
            torch.set_num_threads(threads)
    raise KeyError(f"unknown peer {peer!r}")


# ------------------------------------------------------------------------------------ the suite
def with_steps(spec: DomainBench, steps: int) -> DomainBench:
    """``spec`` with another training budget."""
    budget = {o.split("=")[0] for o in _train_steps(1)}
    kept = [o for o in spec.overrides if o.split("=")[0] not in budget]
    return replace(spec, overrides=[*kept, *_train_steps(steps)])


def _fit_timed(trainer: Trainer) -> tuple[float, PeakMemory]:
    """Train, timing and measuring the peak memory of the optimizer steps alone, then write the checkpoint.

    ``fit()`` would end with a draw of ``trainer.num_samples`` (DDPM-1000 of 256 molecules for ``qm9``)
    that the sweep does not need, since it samples every configuration itself.
    """
    mem = PeakMemory(trainer.device)
    with mem.measure():
        _sync(trainer.device)
        t0 = time.perf_counter()
        trainer.train_steps()
        _sync(trainer.device)
        wall = time.perf_counter() - t0
    trainer.save()
    return wall, mem


def bench_domain(
    name: str,
    spec: DomainBench,
    device: torch.device,
    run_root: Path,
    quick: bool,
    seed: int,
    data_root: Optional[str] = None,
) -> dict[str, Any]:
    overrides = [*spec.overrides, f"trainer.device={device}", f"seed={seed}"]
    if spec.data and data_root:
        overrides.append(f"{spec.data[1]}={data_root}")
    trainer, train = _train(spec.recipe, overrides, run_root / name)
    result: dict[str, Any] = {
        "recipe": spec.recipe,
        "overrides": overrides,
        "train": train,
        "reference": trainer.domain.reference_metrics(spec.num_samples),
        "sampling": [],
        "throughput_vs_batch": [train_throughput(trainer, b) for b in spec.batch_sizes],
        "throughput_vs_size": [
            size_throughput(trainer, spec.scaling[0], v, spec.batch_sizes[0]) for v in spec.scaling[1]
        ]
        if spec.scaling
        else [],
    }
    if isinstance(trainer.domain, LatentDomain):  # the first stage's cost, apart; its ceiling beside the real data's
        result["first_stage"] = first_stage_cost(trainer.domain, run_root / f"{name}-first-stage-cache")
        result.update(reconstruction_row(trainer.domain, spec.num_samples))
    if spec.compile_check:
        try:
            result["compile"] = compile_speedup(trainer, spec.batch_sizes[-1])
        except Exception as err:  # a compiler that fails on this network must not lose the domain's figures
            traceback.print_exc()
            result["compile"] = {"error": f"{type(err).__name__}: {err}"}
    guidance = spec.guidance if trainer.domain.num_classes else [1.0]
    _sweep(name, trainer, spec, spec.samplers, guidance, seed, result, trainer.cfg["objective"].get("name", "vp"))
    result["peers"] = {}
    for peer in spec.peers:
        try:
            result["peers"][peer] = (
                diffusers_on_trained(trainer, spec.num_samples, seed)
                if peer == "diffusers"
                else run_peer(peer, device, quick)
            )
        except Exception as err:  # a missing bench extra must not lose the domain's figures
            result["peers"][peer] = {"error": f"{type(err).__name__}: {err}"}
    result["objectives"] = {}
    for objective, extra, samplers in spec.objectives:  # the same budget, another objective: its own sweep
        print(f"[bench] {name}: training with objective {objective} ({time.strftime('%H:%M:%S')}) ...", flush=True)
        try:
            other, result["objectives"][objective] = _train(
                spec.recipe, [*overrides, *extra], run_root / f"{name}-{objective}"
            )
        except Exception as err:
            traceback.print_exc()
            result["objectives"][objective] = {"error": f"{type(err).__name__}: {err}"}
            continue
        _sweep(name, other, spec, samplers, [1.0], seed, result, objective)
    return result


@contextmanager
def _latent_cache(folder: Path) -> Iterator[None]:
    """``polydiff.latent``'s cache in ``folder`` (``$POLYDIFF_CACHE/latent``) for the block, the previous one after."""
    before = os.environ.get("POLYDIFF_CACHE")
    os.environ["POLYDIFF_CACHE"] = str(folder)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("POLYDIFF_CACHE", None)
        else:
            os.environ["POLYDIFF_CACHE"] = before


def first_stage_cost(domain: LatentDomain, folder: Path) -> dict[str, Any]:
    """What a latent model pays for its first stage, apart from its own training: encoding the training split (what
    :class:`polydiff.latent.LatentDomain` does once and caches), timed on a cold cache (a fresh ``folder``, removed
    after: the split is encoded, never read back), and for a trained autoencoder run its own training time
    (:func:`run_training_time`). A fixed stage (``mel``) has no training."""
    shutil.rmtree(folder, ignore_errors=True)
    cold = LatentDomain(domain.inner, domain.autoencoder, domain.spec)  # the same stage, nothing encoded yet
    try:
        with _latent_cache(folder):
            t0 = time.perf_counter()
            train_set = cold.dataset("train")
            encode_s = time.perf_counter() - t0
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    learned = Path(domain.spec).expanduser().exists()  # a trained run's folder or checkpoint; a fixed stage is a name
    out: dict[str, Any] = {
        "autoencoder": domain.spec,
        "kind": "trained" if learned else "fixed",
        "encode_train_s": encode_s,
        "encoded_items": len(train_set),
        "data_shape": list(domain.inner.sample_shape or ()),
        "latent_shape": list(train_set.z.shape[1:]),
    }
    if learned:
        out.update(run_training_time(domain.spec))
    return out


def run_training_time(spec: str) -> dict[str, Any]:
    """A trained run's own training, read from it (a first stage's ``latent.autoencoder=RUN``, a distilled teacher):
    its steps and the seconds its ``metrics.jsonl`` train records span (each record's steps x samples a step / its
    samples/s: the optimizer steps, with the checkpoints and draws among them). ``training_s`` is None, with the
    reason, where the log is missing."""
    from polydiff.checkpoint import load_checkpoint, run_checkpoint

    path = Path(spec).expanduser()
    ckpt_path = run_checkpoint(path)
    log_path = (path if path.is_dir() else ckpt_path.parent.parent) / "metrics.jsonl"  # RUN/checkpoints/last.pt
    ckpt = load_checkpoint(ckpt_path, mmap=True)
    tc = ckpt["config"]["trainer"]
    out: dict[str, Any] = {"training_steps": int(ckpt["step"]), "training_source": str(log_path)}
    if not log_path.is_file():
        return {**out, "training_s": None, "training_note": f"no {log_path}: the run's training time is unknown"}
    per_step = int(tc["batch_size"]) * int(tc.get("grad_accum", 1))
    seconds, last = 0.0, 0
    for line in log_path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a torn last line (a kill mid-write)
            continue
        if record.get("kind") != "train" or not record.get("samples_per_s"):
            continue
        seconds += (record["step"] - last) * per_step * record.get("world_size", 1) / record["samples_per_s"]
        last = record["step"]
    return {**out, "training_s": seconds}


def audio_latent_speed(domains: dict[str, Any]) -> list[dict[str, Any]]:
    """``audio_latent`` against ``audio``: seconds of audio generated per second at equal objective, sampler, steps
    and guidance (the rows both sweeps have), and their ratio."""

    def key(r: dict[str, Any]) -> tuple:
        return r.get("objective", "vp"), r["sampler"], r["steps"], r["guidance"]

    wave = {key(r): r for r in domains.get("audio", {}).get("sampling", []) if "audio_seconds_per_s" in r}
    rows = []
    for r in domains.get("audio_latent", {}).get("sampling", []):
        w = wave.get(key(r))
        if w is None or "audio_seconds_per_s" not in r:
            continue
        rows.append(
            {
                "objective": r.get("objective", "vp"),
                "sampler": r["sampler"],
                "steps": r["steps"],
                "guidance": r["guidance"],
                "audio_s_per_s": w["audio_seconds_per_s"],
                "audio_latent_s_per_s": r["audio_seconds_per_s"],
                "ratio_latent_over_waveform": r["audio_seconds_per_s"] / w["audio_seconds_per_s"],
            }
        )
    return rows


#: Held-out items and strata of the variational bound of a benchmarked model: seconds on a CPU.
NLL_ITEMS, NLL_STRATA = 64, 50


def nll_row(trainer: Trainer, n: int = NLL_ITEMS, strata: int = NLL_STRATA) -> dict[str, Any]:
    """``polydiff eval --nll bound`` of the trainer's EMA network on ``n`` held-out items (Ho et al. 2020, eq. 5), or
    ``{"error": why}`` where the model has no likelihood (a latent model)."""
    from polydiff.build import Parts
    from polydiff.nll import evaluate_nll

    parts = Parts(trainer.domain, trainer.ema.module, trainer.parts.schedule, trainer.parts.objective)
    try:
        row = evaluate_nll(parts, "bound", n=n, steps=strata, device=trainer.device)
    except ValueError as err:
        return {"error": str(err)}
    keys = ("n", "nll_nats", "nll_nats_sem", "nll_bpd", "nll_bpd_sem", "time", "steps", "decoder")
    return {k: row[k] for k in keys if k in row}


def _train(recipe: str, overrides: list[str], run_dir: Path) -> tuple[Trainer, dict[str, Any]]:
    """Train ``recipe`` with ``overrides`` (a plug-in renamed there leaves the recipe's options it does not take) in
    ``run_dir``; the trainer and its training figures, with the bound on held-out data before and after training."""
    cfg, _ = retarget_plugins(to_plain(compose_recipe(ROOT / recipe, overrides)), overrides)
    trainer = Trainer(cfg, run_dir)
    at_start = nll_row(trainer)  # the EMA holds the initial weights
    train_wall, mem = _fit_timed(trainer)
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    curve = [{"step": r["step"], "loss": r["loss"]} for r in records if r["kind"] == "train"]
    sps = [r["samples_per_s"] for r in records if r["kind"] == "train"][1:] or [records[0]["samples_per_s"]]
    return trainer, {
        "steps": trainer.step,
        "wall_s": train_wall,
        "samples_per_s": sum(sps) / len(sps),
        "peak_mem_mb": mem.peak_mb,
        "final_loss": curve[-1]["loss"],
        "loss_curve": curve,
        "nll": {"start": at_start, "trained": nll_row(trainer)},
    }


def _sweep(
    name: str,
    trainer: Trainer,
    spec: DomainBench,
    samplers: list[SamplerRow],
    guidance: list[float],
    seed: int,
    result: dict[str, Any],
    objective: str,
) -> None:
    """Sample every ``(sampler, steps[, options])`` at every guidance scale into ``result["sampling"]`` (failures
    beside), each row labelled with ``objective`` (the variant's name)."""
    for sampler, steps, *rest in samplers:
        options = rest[0] if rest else None
        steps = int(trainer.cfg["schedule"]["steps"]) if steps == TRAINING_T else steps
        for scale in guidance:
            if scale != 1.0 and steps > spec.max_guided_steps:
                continue
            try:
                row = sampler_row(trainer, sampler, steps, scale, spec.num_samples, seed, objective, options)
            except Exception as err:  # one row (out of memory at DDPM-1000, say) must not lose the trained domain
                traceback.print_exc()
                result.setdefault("sampling_errors", []).append(
                    {
                        "objective": objective,
                        "sampler": sampler_label(sampler, options),
                        "steps": steps,
                        "guidance": scale,
                        "error": f"{type(err).__name__}: {err}",
                    }
                )
                continue
            print(
                f"[bench] {name}: {row['objective']} {row['sampler']}-{steps} ({row['nfe']} NFE) guidance {scale}: "
                f"{row['wall_s']:.1f} s, {row['metrics']}",
                flush=True,
            )
            result["sampling"].append(row)


def _git(*args: str) -> Optional[str]:
    """``git ARGS`` in polydiff's own checkout; None when installed from a wheel (no .git beside the packages)."""
    if not (ROOT / ".git").exists():
        return None
    try:
        proc = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    except OSError:
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def environment(device: torch.device) -> dict[str, Any]:
    """Where a result was measured: commit (and whether the tree had uncommitted changes), torch, device, date."""
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    import polydiff

    return {
        "git_commit": commit or "unknown",
        "git_dirty": None if status is None else bool(status),
        "polydiff": polydiff.__version__,
        "torch": torch.__version__,
        "device": str(device),
        "device_name": name,
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def run_suite(
    suite: str,
    domains: Optional[list[str]],
    device: str,
    out_dir: Path,
    seed: int = 0,
    specs: Optional[dict[str, DomainBench]] = None,
    data: Optional[dict[str, str]] = None,
) -> Path:
    """Run a suite; returns the JSON result path (Markdown and plots beside it).

    ``data`` maps a data set's name (``qm9``, ``sc09``) to its local copy; a domain that needs one
    that is not given (and not installed as a package: QM9's qm9pack) is skipped, and the result says how to place it.
    """
    all_specs = specs or suites()[suite]
    data = data or {}
    names = domains or list(all_specs)
    unknown = [d for d in names if d not in all_specs]
    if unknown:
        raise KeyError(f"no benchmark configuration for domain(s) {unknown}; known: {sorted(all_specs)}")
    dev = resolve_device(device)
    env = environment(dev)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    tag = f"{stamp}_{suite}_{env['device_name'] if dev.type == 'cuda' else 'cpu'}".replace(" ", "-").replace("/", "-")
    run_root = out_dir / "runs" / tag
    result: dict[str, Any] = {
        "suite": suite,
        "seed": seed,
        "environment": env,
        "config": {n: vars(all_specs[n]) for n in names},
        "domains": {},
    }
    for name in names:
        spec = all_specs[name]
        if spec.data and spec.data[0] not in data and not packaged(spec.data[0]):
            key, _, where = spec.data
            result["domains"][name] = {"skipped": f"needs a local copy of {key.upper()}: {_placing(key, where)}"}
            print(f"[bench] {name}: skipped ({result['domains'][name]['skipped']})", flush=True)
            continue
        print(f"[bench] {name}: training ({time.strftime('%H:%M:%S')}) ...", flush=True)
        try:
            result["domains"][name] = bench_domain(
                name, spec, dev, run_root, suite == "quick", seed, data.get(spec.data[0]) if spec.data else None
            )
        except Exception as err:
            traceback.print_exc()
            result["domains"][name] = {"error": f"{type(err).__name__}: {err}"}
    return write_result(result, out_dir, tag)


def write_result(result: dict[str, Any], out_dir: Path, tag: str) -> Path:
    """``out_dir/tag.json``, the Markdown table beside it and the plots in ``out_dir/tag/``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    speed = audio_latent_speed(result["domains"])  # a merge of separate jobs compares them too
    if speed:
        result["audio_latent_vs_audio"] = speed
    path = out_dir / f"{tag}.json"
    path.write_text(json.dumps(result, indent=2, default=float))
    from benchmarks.report import write_markdown, write_plots

    md = write_markdown(result, path.with_suffix(".md"))
    write_plots(result, out_dir / tag)
    print(md)
    print(f"[bench] wrote {path}, {path.with_suffix('.md')} and plots in {out_dir / tag}")
    return path


def merge_results(paths: list[Path], out_dir: Path) -> Path:
    """One result (JSON, Markdown, plots) from runs of the same suite, e.g. one domain per job.

    Each domain keeps the environment it ran in; a domain measured in two files is an error,
    while a skipped or failed entry gives way to a measured one.
    """
    results = []
    for path in paths:
        try:
            results.append((path, json.loads(Path(path).read_text())))
        except (OSError, json.JSONDecodeError) as err:
            raise SystemExit(f"polydiff bench --merge: cannot read {path}: {err}") from err
        if not {"suite", "environment", "domains"} <= set(results[-1][1]):
            raise SystemExit(
                f"polydiff bench --merge: {path} is not a polydiff bench result (no suite/environment/domains)"
            )
    suite_names = sorted({r["suite"] for _, r in results})
    if len(suite_names) > 1:
        raise SystemExit(
            f"polydiff bench --merge: the files come from different suites {suite_names}; merge one suite at a time"
        )
    first = results[0][1]
    merged: dict[str, Any] = {
        "suite": first["suite"],
        "seed": first["seed"],
        "environment": first["environment"],
        "config": {},
        "domains": {},
        "merged_from": [str(p) for p, _ in results],
    }
    origin: dict[str, Path] = {}
    for path, r in results:
        for name, d in r["domains"].items():
            ran = not ({"error", "skipped"} & set(d))
            if name in merged["domains"]:
                kept_ran = not ({"error", "skipped"} & set(merged["domains"][name]))
                if ran and kept_ran:
                    raise SystemExit(
                        f"polydiff bench --merge: domain {name!r} was measured in both {origin[name]} and "
                        f"{path}; pass only one of them"
                    )
                if not ran:
                    continue
            # A merged file's domains already say where they ran (its own environment is its first file's).
            merged["domains"][name] = {**d, "environment": d.get("environment", r["environment"])}
            merged["config"][name] = r["config"].get(name)
            origin[name] = path
    # Where each domain ran, through earlier merges too.
    envs = [d["environment"] for d in merged["domains"].values()] or [r["environment"] for _, r in results]
    devices = sorted({e["device_name"] if e["device"].startswith("cuda") else "cpu" for e in envs})
    tag = f"{time.strftime('%Y%m%d-%H%M%S')}_{first['suite']}_{'+'.join(devices)}_merged".replace(" ", "-").replace(
        "/", "-"
    )
    return write_result(merged, out_dir, tag)


def main(argv: Optional[list[str]] = None) -> Path:
    p = argparse.ArgumentParser(
        prog="polydiff bench", description="Benchmark every domain's training, samplers and peers."
    )
    p.add_argument("--suite", choices=("quick", "full"), default="quick")
    p.add_argument(
        "--domains",
        nargs="+",
        default=None,
        help="default: every domain of the suite, or only the --recipe domains when given",
    )
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--out",
        type=Path,
        default=RESULTS,
        help="results folder (default ./benchmarks/results); training runs go to OUT/runs",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--recipe",
        action="append",
        default=[],
        metavar="NAME=RECIPE.yaml",
        help="benchmark your own domain's recipe (repeatable), with the suite's sampler sweep; "
        "with --domains, beside built-in ones",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="training budget of every domain (default: the suite's; --recipe domains: quick 500, full 20000)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=V",
        dest="overrides",
        help="a recipe override for every domain (repeatable), e.g. --set trainer.compile=true",
    )
    p.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="local copy of a literature data set for the full suite: qm9=PATH (" + QM9_HELP + "; not needed "
        "with the qm9pack package installed), sc09=PATH (" + SC09_HELP + ")",
    )
    p.add_argument(
        "--merge",
        nargs="+",
        type=Path,
        default=None,
        metavar="RESULT.json",
        help="combine results of the same suite (e.g. one domain per job) into one report, then stop",
    )
    a = p.parse_args(argv)
    if a.merge:
        return merge_results(a.merge, a.out)
    if a.data and a.suite != "full":
        raise SystemExit(
            f"polydiff bench: --data is for the full suite's literature settings (qm9, sc09), not --suite "
            f"{a.suite}: add --suite full (e.g. --suite full --domains qm9 --data qm9=PATH)"
        )
    data = {}
    for item in a.data:
        key, sep, path = item.partition("=")
        if not sep or key not in ("qm9", "sc09"):
            raise SystemExit(f"polydiff bench: --data needs qm9=PATH or sc09=PATH, got {item!r}")
        data[key] = str(Path(path).expanduser().resolve())
        if not Path(path).is_dir():
            raise SystemExit(
                f"polydiff bench: --data {item}: no folder at {data[key]}; place "
                f"{QM9_HELP if key == 'qm9' else SC09_HELP}"
            )
    if a.steps is not None and a.steps < 1:
        raise SystemExit(f"polydiff bench: --steps must be at least 1, got {a.steps}")
    specs = dict(suites()[a.suite])
    if a.steps:
        specs = {n: with_steps(s, a.steps) for n, s in specs.items()}
    for item in a.recipe:
        name, sep, recipe = item.partition("=")
        if not sep or not Path(recipe).is_file():
            raise SystemExit(f"polydiff bench: --recipe needs NAME=PATH to an existing recipe, got {item!r}")
        steps = a.steps or (500 if a.suite == "quick" else 20000)
        base = specs["points"]  # the generic sweep (every sampler and step count)
        quick = a.suite == "quick"  # a network of unknown cost: fewer samples, guided sweeps up to 100 steps
        specs[name] = DomainBench(
            str(Path(recipe).resolve()),
            _train_steps(steps),
            128 if quick else base.num_samples,
            base.samplers,
            guidance=[1.0, 3.0],
            batch_sizes=base.batch_sizes[:2],
            peers=["diffusers"],
            max_guided_steps=100 if quick else 10**9,
        )
    for item in a.overrides:
        if "=" not in item:
            raise SystemExit(f"polydiff bench: --set needs KEY=VALUE (a recipe override), got {item!r}")
    try:
        check_overrides(a.overrides)
    except KeyError as err:
        raise SystemExit(f"polydiff bench: --set: {err.args[0]}") from err
    specs = {n: replace(s, overrides=[*s.overrides, *a.overrides]) for n, s in specs.items()}
    # --recipe alone benchmarks those domains; --domains adds built-in ones beside them (--domains points mine).
    domains = a.domains or [item.partition("=")[0] for item in a.recipe] or list(suites()[a.suite])
    unknown = [d for d in domains if d not in specs]
    if unknown:
        other = [d for d in unknown if d in suites()["full" if a.suite == "quick" else "quick"]]
        hint = f"; {other} belong to --suite {'full' if a.suite == 'quick' else 'quick'}" if other else ""
        raise SystemExit(
            f"polydiff bench: no {a.suite}-suite configuration for domain(s) {unknown}; known: "
            f"{sorted(specs)}{hint} (a domain of your own: --recipe NAME=RECIPE.yaml)"
        )
    unused = sorted(set(data) - {specs[d].data[0] for d in domains if specs[d].data})
    if unused:
        raise SystemExit(
            f"polydiff bench: --data {' '.join(f'{k}=...' for k in unused)} is given but no domain that "
            f"reads it is benchmarked (domains: {' '.join(domains)}); add --domains {' '.join(unused)}"
        )
    missing = {
        d: specs[d].data
        for d in domains
        if specs[d].data and specs[d].data[0] not in data and not packaged(specs[d].data[0])
    }
    if missing and len(missing) == len(domains):  # nothing would run: a result of skips only, and exit status 0
        raise SystemExit(
            "polydiff bench: nothing to benchmark without the local data: "
            + "; ".join(f"{d} needs its data: {_placing(key, where)}" for d, (key, _, where) in missing.items())
        )
    path = run_suite(a.suite, domains, a.device, a.out, a.seed, specs=specs, data=data)
    results = json.loads(path.read_text())["domains"]
    failed = {n: r["error"] for n, r in results.items() if "error" in r}
    failed.update(
        {
            f"{n} objective {o}": e["error"]
            for n, r in results.items()
            for o, e in r.get("objectives", {}).items()
            if "error" in e
        }
    )
    failed.update(
        {
            f"{n} {e['sampler']}-{e['steps']} guidance {e['guidance']}": e["error"]
            for n, r in results.items()
            for e in r.get("sampling_errors", [])
        }
    )
    if failed:  # the results are written; the exit status still says the run is not whole
        raise SystemExit(
            f"polydiff bench: {len(failed)} domain(s) or sampler row(s) failed "
            f"({'; '.join(f'{n}: {e}' for n, e in failed.items())}); results so far in {path}"
        )
    return path
