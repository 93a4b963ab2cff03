"""Consistency distillation (``objective.name=consistency``): a student that maps any point of its teacher's
probability-flow ODE trajectory to the trajectory's start, in one network call.

Song, Dhariwal, Chen & Sutskever 2023, Alg. 2: on ``N`` noise levels ``sigma_1 < ... < sigma_N`` (EDM's grid,
``rho = 7``, from the teacher's first trained level up to the paper's 80, ``sigma = sigma(t) / alpha(t)`` in EDM's
coordinates), a state noised to level ``n + 1`` is moved one step down the teacher's ODE (Heun or DDIM), and the
student's output there is pulled towards a target network's output at level ``n``. The consistency function is
``f(x, t) = c_skip(sigma) x / alpha + c_out(sigma) F(x, t)`` with the paper's scalings (Sec. 3), so ``f = x / alpha``
at ``sigma_1`` (the boundary condition). ``F`` is read from the student's clean estimate ``D`` (in the student's
parameterisation, see :mod:`polydiff.distill`) as the ``F`` for which the unshifted scalings give ``f = D``: the
teacher's weights start the student as the teacher's own denoiser away from ``sigma_1``, and for a v-prediction
student with ``sigma_data = 1``, ``F`` is exactly minus the network's v. The target network is the trainer's EMA of
the student (``trainer.ema_decay`` is the paper's ``mu``; a resumed run restores it with the checkpoint), or the
student itself where there is no trainer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from .distill import StudentGrid, StudentObjective, ddim_step
from .objective_base import register_objective
from .schedules import Schedule
from .space import Space
from .state import Batch, DenoiserFn, Prediction

__all__ = ["ConsistencyObjective", "consistency_scalings", "SOLVERS"]

SOLVERS = ("heun", "ddim")


def consistency_scalings(sigma: Tensor, sigma_min: float, sigma_data: float) -> tuple[Tensor, Tensor]:
    """``c_skip``, ``c_out`` at EDM noise levels ``sigma`` (Song et al. 2023, Sec. 3): 1 and 0 at ``sigma_min``."""
    shifted = sigma - sigma_min
    c_skip = sigma_data**2 / (shifted**2 + sigma_data**2)
    c_out = sigma_data * shifted / (sigma_data**2 + sigma**2).sqrt()
    return c_skip, c_out


@register_objective("consistency")
@dataclass
class ConsistencyObjective(StudentObjective):
    """Consistency distillation of ``teacher`` on ``steps`` Karras noise levels (``rho``) up to ``sigma_max`` (the
    paper's 80, or the schedule's last level if lower), its ODE stepped by ``solver`` (``heun``: two teacher calls a
    step; ``ddim``: one), scalings with ``sigma_data``. Sampling starts from N(0, I) at the top level, as EDM's
    samplers do (at sigma 80 the signal is 1.2% of the state)."""

    steps: int = 18
    solver: str = "heun"
    sigma_data: float = 1.0
    sigma_max: float = 80.0
    rho: float = 7.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.steps < 2:
            raise ValueError(f"objective.steps={self.steps}: consistency distillation needs at least 2 noise levels")
        if self.solver not in SOLVERS:
            raise ValueError(f"objective.solver={self.solver!r}: choose one of {list(SOLVERS)}")
        if min(float(self.sigma_data), float(self.sigma_max), float(self.rho)) <= 0:
            raise ValueError(
                f"objective.sigma_data={self.sigma_data}, sigma_max={self.sigma_max}, rho={self.rho}: all must be > 0"
            )
        self._target: Optional[nn.Module] = None

    def use_target(self, module: nn.Module) -> None:
        """Read ``module`` (the trainer's EMA of the student) as the target network ``theta^-``."""
        self._target = module

    def grid(self, schedule: Schedule) -> StudentGrid:
        """The base path at ``steps`` noise levels spaced as EDM's grid (Karras et al. 2022, eq. 5)."""
        first = 1.0 / schedule.num_steps if schedule.num_steps else 1e-3
        last = 1.0 if float(schedule.alpha_bar(torch.tensor(1.0))) > 0 else 1.0 - first  # zero terminal SNR
        ends = schedule.alpha_bar(torch.tensor([first, last], dtype=torch.float64))
        lo, top = ((1 - ends) / ends).sqrt().tolist()  # EDM sigma at the first and last trained level
        hi = min(top, float(self.sigma_max))
        if hi <= lo:
            raise ValueError(f"objective.sigma_max={self.sigma_max} must exceed the first trained level's {lo:.3g}")
        ramp = torch.linspace(0, 1, self.steps, dtype=torch.float64)
        sigmas = (lo ** (1 / self.rho) + ramp * (hi ** (1 / self.rho) - lo ** (1 / self.rho))) ** self.rho
        times = schedule.t_at_sigma(sigmas)
        times[0] = first  # exactly, not as bisection finds it
        if hi == top:
            times[-1] = last
        if (times[1:] <= times[:-1]).any():
            raise ValueError(
                f"objective.steps={self.steps} noise levels do not fit between the schedule's trained steps: "
                "lower objective.steps"
            )
        return StudentGrid(schedule, times, name=f"{schedule.name}@karras{self.steps}")

    def consistency_function(
        self, net: Callable[..., Tensor], grid: StudentGrid, space: Space, cond: dict
    ) -> Callable[[Tensor, Tensor], Tensor]:
        """``f(x_t, t[B])``: the clean state of the ODE trajectory through ``x_t`` at student time ``t``."""
        student = self.student_denoiser(net, grid, space, cond)
        sigma_min = math.sqrt((1 - float(grid.alpha_bar_table[1])) / float(grid.alpha_bar_table[1]))
        sigma_data = float(self.sigma_data)

        def f(x_t: Tensor, t: Tensor) -> Tensor:
            ab = grid.alpha_bar(t)  # [B] float64
            alpha, sigma = ab.sqrt(), ((1 - ab) / ab).sqrt()
            c_skip, c_out = consistency_scalings(sigma, sigma_min, sigma_data)
            d_skip, d_out = consistency_scalings(sigma, 0.0, sigma_data)  # D = d_skip x / alpha + d_out F
            y = x_t * space.expand((1 / alpha).to(x_t.dtype))  # x_0 + sigma eps
            big_f = (student(x_t, t).x0 - space.expand(d_skip.to(x_t.dtype)) * y) / space.expand(d_out.to(x_t.dtype))
            return space.expand(c_skip.to(x_t.dtype)) * y + space.expand(c_out.to(x_t.dtype)) * big_f

        return f

    def denoiser(
        self, net: Callable[..., Tensor], schedule: Schedule, space: Space, cond: Optional[dict] = None
    ) -> DenoiserFn:
        """The consistency function as a denoiser: ``x0 = f(x_t, t)``, ``eps`` the noise it implies."""
        grid = self.grid_of(schedule)
        f = self.consistency_function(net, grid, space, dict(cond or {}))

        def denoise(x_t: Tensor, t: Tensor) -> Prediction:
            alpha, sigma = grid.alpha_sigma(t, dtype=x_t.dtype)
            x0 = f(x_t, t)
            return Prediction(x0, (x_t - x0 * space.expand(alpha)) / space.expand(sigma))

        return denoise

    def teacher_step(self, den: DenoiserFn, x: Tensor, t_hi: Tensor, t_lo: Tensor, grid: StudentGrid, space: Space):
        """The teacher's ODE from ``x`` at student time ``t_hi`` down to ``t_lo`` (``[B]`` each): one DDIM step, or
        Heun's (EDM's Alg. 1, in the variance-preserving state: ``x / alpha`` moves along the predicted noise)."""
        a_hi, s_hi = grid.alpha_sigma(t_hi, dtype=torch.float64)
        a_lo, s_lo = grid.alpha_sigma(t_lo, dtype=torch.float64)
        b_hi, b_lo = grid.base_time(t_hi), grid.base_time(t_lo)
        if self.solver == "ddim":
            return ddim_step(den, x, b_hi, a_lo, s_lo, space)
        first = den(x, b_hi.to(x.dtype))
        euler = space.project(first.x0 * space.expand(a_lo.to(x.dtype)) + first.eps * space.expand(s_lo.to(x.dtype)))
        eps = (first.eps + den(euler, b_lo.to(x.dtype)).eps) / 2
        ratio = a_lo / a_hi
        moved = x * space.expand(ratio.to(x.dtype)) + eps * space.expand((s_lo - ratio * s_hi).to(x.dtype))
        return space.project(moved)

    def losses(
        self,
        net: Callable[..., Tensor],
        batch: Batch,
        schedule: Schedule,
        generator: Optional[torch.Generator] = None,
        t: Optional[Tensor] = None,
    ) -> Tensor:
        """Per-sample squared distances ``[B]`` between the student at level ``n + 1`` and the target network at the
        teacher's step to level ``n`` (``t[B]``: the upper student times, drawn from ``2/N .. 1`` if not given)."""
        grid, space, x0 = self.grid_of(schedule), batch.space, batch.x
        n, device = grid.num_steps, x0.device
        if t is None:
            gdev = generator.device if generator is not None else device
            t = torch.randint(2, n + 1, (space.num_samples,), generator=generator, device=gdev).to(device) / n
        t_hi = t.double()
        t_lo = t_hi - 1.0 / n
        alpha, sigma = grid.alpha_sigma(t_hi, dtype=x0.dtype)
        x_hi = space.expand(alpha) * x0 + space.expand(sigma) * space.randn(generator=generator, dtype=x0.dtype)
        cond = dict(batch.cond)
        with torch.no_grad():
            x_lo = self.teacher_step(self.teacher_denoiser(space, cond, device), x_hi, t_hi, t_lo, grid, space)
            target_net = net if self._target is None else self._target
            target = self.consistency_function(target_net, grid, space, cond)(x_lo, t_lo)
        online = self.consistency_function(net, grid, space, cond)(x_hi, t_hi)
        return space.mean((online.float() - target.float()) ** 2)
