"""Mutation check of the core: does the test suite notice when the maths or a safety check is quietly wrong?

Each mutant changes one line of the sampler, schedule, objective, guidance, EMA or allow-list code. The script copies
the tree to a temporary folder once, applies one mutant at a time there, runs the tests that cover that code and
counts the mutant killed when they fail. A survivor is a test gap. Run on demand (minutes, not in CI)::

    python tests/mutation.py            # every mutant: "killed K of N" and the survivors
    python tests/mutation.py --list     # the mutants
    python tests/mutation.py --only ema_decay_inverted
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COPIED = ("polydiff", "domains", "examples", "recipes", "tests", "benchmarks", "pyproject.toml")


@dataclass(frozen=True)
class Mutant:
    """Replace ``old`` (which must occur exactly once in ``path``) by ``new``; ``tests`` should then fail."""

    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


SAMPLERS = ("tests/test_samplers.py",)
OBJECTIVES = ("tests/test_schedules_objectives.py",)
CONTINUOUS = ("tests/test_continuous.py",)
SAFETY = ("tests/test_security.py",)

MUTANTS = [
    # samplers
    Mutant(
        "ddim_eps_weight_squared",
        "polydiff/samplers.py",
        "eps_w = (s[1:] ** 2 - c**2).clamp(min=0).sqrt()",
        "eps_w = (s[1:] ** 2 - c**2).clamp(min=0)",
        SAMPLERS,
    ),
    Mutant(
        "ddpm_large_variance_is_small",
        "polydiff/samplers.py",
        'var = beta_ts * (1 - ab_s) / one_m_ab_t if variance == "small" else beta_ts',
        "var = beta_ts * (1 - ab_s) / one_m_ab_t",
        SAMPLERS,
    ),
    Mutant(
        "ddpm_noise_on_final_step",
        "polydiff/samplers.py",
        "var = var.masked_fill(grid[1:] == 0, 0.0)",
        "var = var",
        SAMPLERS,
    ),
    Mutant(
        "dpmpp_first_order_only",
        "polydiff/samplers.py",
        "k = (0.5 / r).masked_fill(final, 0.0)",
        "k = (0.0 / r).masked_fill(final, 0.0)",
        SAMPLERS,
    ),
    Mutant(
        "trailing_spacing_starts_short",
        "polydiff/sampling.py",
        "idx = torch.round(torch.arange(T, 0, -T / steps, dtype=torch.float64))[:steps]",
        "idx = torch.round(torch.arange(T - 1, 0, -T / steps, dtype=torch.float64))[:steps]",
        SAMPLERS,
    ),
    # schedules
    Mutant(
        "cosine_offset_ignored",
        "polydiff/schedules.py",
        "f = torch.cos((t + offset) / (1 + offset) * math.pi / 2) ** 2",
        "f = torch.cos(t * math.pi / 2) ** 2",
        OBJECTIVES,
    ),
    Mutant(
        "alpha_bar_nearest_not_linear",
        "polydiff/schedules.py",
        "return torch.lerp(table[lo], table[lo + 1], pos - lo)",
        "return table[lo]",
        OBJECTIVES + SAMPLERS,
    ),
    Mutant(
        "zero_terminal_snr_unshifted",
        "polydiff/schedules.py",
        "root = (root - last) * first / (first - last)",
        "root = root * first / (first - last)",
        OBJECTIVES,
    ),
    # objectives
    Mutant(
        "v_target_sign",
        "polydiff/objectives.py",
        "target=lambda x0, eps, a, s: a * eps - s * x0",
        "target=lambda x0, eps, a, s: a * eps + s * x0",
        OBJECTIVES,
    ),
    Mutant(
        "v_to_x0_sign",
        "polydiff/objectives.py",
        "torch.addcmul(a * x_t, s, out, value=-1), torch.addcmul(s * x_t, a, out)",
        "torch.addcmul(a * x_t, s, out, value=1), torch.addcmul(s * x_t, a, out)",
        OBJECTIVES + SAMPLERS,
    ),
    Mutant(
        "min_snr_eps_unclipped",
        "polydiff/objectives.py",
        "gamma / snr.clamp(min=gamma)",
        "1 / snr.clamp(min=1)",
        OBJECTIVES,
    ),
    # guidance
    Mutant(
        "cfg_x0_towards_unconditional",
        "polydiff/guidance.py",
        "x0 = u.x0 + scale * (c.x0 - u.x0)",
        "x0 = c.x0 + scale * (u.x0 - c.x0)",
        ("tests/test_generate.py", "tests/test_samplers.py"),
    ),
    Mutant(
        "cfg_rescale_ignored",
        "polydiff/guidance.py",
        "x0 = rescale * (x0 * factor) + (1 - rescale) * x0",
        "x0 = x0",
        ("tests/test_generate.py", "tests/test_samplers.py"),
    ),
    # EMA
    Mutant(
        "ema_decay_inverted",
        "polydiff/train_step.py",
        "get_ema_multi_avg_fn(decay)",
        "get_ema_multi_avg_fn(1 - decay)",
        ("tests/test_trainer.py",),
    ),
    # allow-list
    Mutant(
        "allow_list_prefix_only",
        "polydiff/safety.py",
        "    if not _defined_in(cls, allowed) or not issubclass(cls, nn.Module):",
        "    if False:",
        SAFETY,
    ),
    Mutant(
        "allow_list_startswith",
        "polydiff/safety.py",
        "    if parts[0] not in allowed:",
        "    if not any(path.startswith(a) for a in allowed):",
        SAFETY,
    ),
    Mutant(
        "hydra_callbacks_unchecked",
        "polydiff/safety.py",
        '    callbacks = hydra.get("callbacks") or {}',
        "    callbacks = {}",
        SAFETY,
    ),
    # the continuous-time family
    Mutant(
        "heun_without_its_correction",
        "polydiff/sigma_samplers.py",
        "d = (eps + eps2) / 2  # the trapezoid's slope dy / dsigma",
        "d = eps2  # the trapezoid's slope dy / dsigma",
        CONTINUOUS,
    ),
    Mutant(
        "sde_noise_too_small",
        "polydiff/sigma_samplers.py",
        "w_z = (a[1:] * (2 * sig[:-1] * (sig[:-1] - sig[1:])).clamp(min=0).sqrt()).masked_fill(final, 0.0).to(dt)",
        "w_z = (a[1:] * (sig[:-1] * (sig[:-1] - sig[1:])).clamp(min=0).sqrt()).masked_fill(final, 0.0).to(dt)",
        CONTINUOUS,
    ),
    Mutant(
        "karras_grid_linear_in_sigma",
        "polydiff/sigma_samplers.py",
        "return torch.cat([(hi + ramp * (lo - hi)) ** rho, torch.zeros(1, dtype=torch.float64)])",
        "return torch.cat([sigma_max + ramp * (sigma_min - sigma_max), torch.zeros(1, dtype=torch.float64)])",
        CONTINUOUS,
    ),
    Mutant(
        "flow_eps_from_the_wrong_end",
        "polydiff/flow.py",
        "return Prediction(torch.addcmul(x_t, tt, v, value=-1), torch.addcmul(x_t, 1 - tt, v))",
        "return Prediction(torch.addcmul(x_t, tt, v, value=-1), torch.addcmul(x_t, tt, v))",
        CONTINUOUS,
    ),
    Mutant(
        "edm_c_out_without_sigma",
        "polydiff/edm.py",
        "sigma * sd / (sigma**2 + sd**2).sqrt()),",
        "sd / (sigma**2 + sd**2).sqrt()),",
        CONTINUOUS,
    ),
    Mutant(
        "edm_loss_weight_inverted",
        "polydiff/edm.py",
        "weight = preconditioning(sigma, self.sigma_data, self.precond)[1] ** -2  # [B]",
        "weight = preconditioning(sigma, self.sigma_data, self.precond)[1] ** 2  # [B]",
        CONTINUOUS,
    ),
    Mutant(
        "kabsch_keeps_reflections",
        "polydiff/couplings.py",
        "fix[-1] = d",
        "fix[-1] = 1.0",
        CONTINUOUS,
    ),
    # learned variance, the learned first stage
    Mutant(
        "learned_std_ends_swapped",
        "polydiff/variance.py",
        "return std_small.pow(1 - v) * std_large.pow(v)",
        "return std_small.pow(v) * std_large.pow(1 - v)",
        ("tests/test_learned_variance.py",),
    ),
    Mutant(
        "first_stage_kl_without_variance",
        "polydiff/first_stage.py",
        "return 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)",
        "return 0.5 * mean.square().flatten(1).sum(1)",
        ("tests/test_autoencoder.py",),
    ),
    Mutant(
        "unfinished_first_stage_accepted",
        "polydiff/build.py",
        "    if step < total:\n",
        "    if step < 0:\n",
        ("tests/test_autoencoder.py",),
    ),
    # students of flow and EDM teachers
    Mutant(
        "student_reads_every_teacher_as_v",
        "polydiff/distill.py",
        'if self.base.get("name", "vp") == "vp":',
        "if True:",
        ("tests/test_distill.py",),
    ),
    Mutant(
        "consistency_f_from_shifted_scalings",
        "polydiff/consistency.py",
        "d_skip, d_out = consistency_scalings(sigma, 0.0, sigma_data)",
        "d_skip, d_out = consistency_scalings(sigma, sigma_min, sigma_data)",
        ("tests/test_distill.py",),
    ),
]


def _run(tree: Path, tests: tuple[str, ...], timeout: float) -> bool:
    """Whether ``tests`` pass in ``tree`` (its own polydiff first on the import path)."""
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    try:
        done = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False  # a mutant that hangs the tests is noticed
    return done.returncode == 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--list", action="store_true", help="list the mutants and exit")
    p.add_argument("--only", nargs="*", default=None, help="run these mutants only")
    p.add_argument("--timeout", type=float, default=900, help="seconds for one mutant's tests")
    a = p.parse_args(argv)
    chosen = [m for m in MUTANTS if a.only is None or m.name in a.only]
    if a.list:
        for m in chosen:
            print(f"{m.name}: {m.path}: {m.old!r} -> {m.new!r} ({', '.join(m.tests)})")
        return 0
    with tempfile.TemporaryDirectory(prefix="polydiff-mutation-") as tmp:
        tree = Path(tmp)
        for name in COPIED:
            src = ROOT / name
            (shutil.copytree if src.is_dir() else shutil.copy2)(src, tree / name)
        survivors = []
        for m in chosen:
            path = tree / m.path
            original = path.read_text()
            if original.count(m.old) != 1:
                print(f"{m.name}: stale (its line occurs {original.count(m.old)} times in {m.path}): update it")
                return 2
            path.write_text(original.replace(m.old, m.new))
            t0 = time.perf_counter()
            killed = not _run(tree, m.tests, a.timeout)
            path.write_text(original)
            print(f"{m.name}: {'killed' if killed else 'SURVIVED'} ({time.perf_counter() - t0:.0f} s)", flush=True)
            if not killed:
                survivors.append(m.name)
    print(
        f"killed {len(chosen) - len(survivors)} of {len(chosen)} mutants"
        + (f"; survivors: {', '.join(survivors)}" if survivors else "")
    )
    return 1 if survivors else 0


if __name__ == "__main__":
    raise SystemExit(main())
