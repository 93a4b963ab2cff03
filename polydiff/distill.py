"""Few-step students of a trained run: the time grid they learn on, and progressive distillation (``progressive``).

Progressive distillation (Salimans & Ho 2022, Alg. 2): a v-prediction student learns to take in one DDIM step what
its teacher takes in two. One round halves the step count; ``polydiff distill --method progressive`` runs the rounds
as runs of their own, each round's student teaching the next. Consistency distillation (:mod:`polydiff.consistency`)
shares the grid and the teacher handling kept here.

A student's schedule is a :class:`StudentGrid`: the teacher's schedule read at the student's ``N`` times, as ``N``
trained steps ``i / N``. Samplers therefore step exactly on the grid the student learnt, a ``sampler.steps`` above
``N`` is refused by the samplers' own check, and the network still sees the teacher's time.

A student inherits its path from its first teacher's objective (``objective.base``, written by ``polydiff distill``):
the VP schedule of a ``vp`` teacher, the straight path of a ``flow`` or ``reflow`` one, EDM's of an ``edm`` one. Its
network keeps its teacher's parameterisation where that is defined at pure noise (v or x0 prediction, a velocity,
EDM's preconditioned denoiser), so it starts from the teacher's weights as the same function; an eps teacher's
student learns v instead (Salimans & Ho 2022, sec. 4) and starts away from it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping, Optional

import torch
from torch import Tensor

from .conditioning import null_condition
from .guidance import classifier_free_guidance
from .objective_base import BaseObjective, checked_output, register_objective
from .objectives import build_objective_from, to_prediction
from .sampling import timesteps
from .schedules import NoiseSchedule, Schedule
from .space import Space
from .state import Batch, DenoiserFn
from .teacher import Teacher

__all__ = ["StudentGrid", "StudentObjective", "ProgressiveObjective", "progressive_target", "ddim_step", "BASES"]

log = logging.getLogger("polydiff")

#: The objectives whose models a student can learn from: their paths are the ones a student's grid is read on.
BASES = ("vp", "flow", "reflow", "edm")


class StudentGrid(NoiseSchedule):
    """A student's schedule: ``base`` read at ``times`` (``N`` ascending times in (0, 1] of ``base``) as ``N`` trained
    steps ``i / N``; :meth:`base_time` maps a student time back to ``base``'s, which the network sees."""

    def __init__(self, base: Schedule, times: Tensor, name: str) -> None:
        times = torch.as_tensor(times, dtype=torch.float64).flatten()  # [N]
        super().__init__(base.alpha_bar(times), name=name)
        self.base = base
        self.base_times = torch.cat([torch.zeros(1, dtype=torch.float64), times])  # [N + 1], 0 at clean data
        self._times: dict[torch.device, Tensor] = {}

    def base_time(self, t: Tensor) -> Tensor:
        """``base``'s time at student time ``t`` (float64; exact on the grid ``i / N``, linear between)."""
        t = torch.as_tensor(t).to(torch.float64)
        if t.device not in self._times:
            self._times[t.device] = self.base_times.to(t.device)
        table = self._times[t.device]
        pos = t.clamp(0, 1) * self.num_steps
        lo = pos.long().clamp_(max=self.num_steps - 1)
        return torch.lerp(table[lo], table[lo + 1], pos - lo)


def ddim_step(den: DenoiserFn, x: Tensor, t: Tensor, a: Tensor, s: Tensor, space: Space) -> Tensor:
    """One deterministic DDIM step (Song et al. 2021, eq. 12) of ``den`` from ``x`` at ``t[B]`` to the level of signal
    and noise scales ``a[B]``, ``s[B]``: ``a x0 + s eps``, projected as a sampler's step is."""
    pred = den(x, t.to(x.dtype))
    return space.project(pred.x0 * space.expand(a.to(x.dtype)) + pred.eps * space.expand(s.to(x.dtype)))


def progressive_target(den: DenoiserFn, z: Tensor, times: Tensor, schedule: Schedule, space: Space) -> Tensor:
    """The clean state ``x~`` whose one DDIM step from ``z`` at ``times[0]`` lands where two DDIM steps of ``den`` land
    at ``times[2]`` through ``times[1]`` (Salimans & Ho 2022, Alg. 2); ``times`` ``[3, B]`` descending, in
    ``schedule``'s time."""
    ab = schedule.alpha_bar(times)  # [3, B] float64
    a, s = ab.sqrt(), (1 - ab).sqrt()
    z1 = ddim_step(den, z, times[0], a[1], s[1], space)
    z2 = ddim_step(den, z1, times[1], a[2], s[2], space)
    ratio = s[2] / s[0]  # [B]; 0 on the last step, where x~ is the teacher's second x0
    num = z2 - z * space.expand(ratio.to(z.dtype))
    return num / space.expand((a[2] - ratio * a[0]).to(z.dtype))


@dataclass
class StudentObjective(BaseObjective):
    """What every student shares: its teacher run (``teacher``, loaded for training only, so a student samples
    without it), checked against the objectives it can learn from; ``base``, the objective section of the first
    teacher of the chain, whose path the student's grid is read on; the teacher's denoiser, guided at a fixed
    ``guidance_scale`` when not 1 (classifier-free guidance, distilled into the student); ``steps`` of its grid."""

    teacher: str = ""
    steps: int = 4
    guidance_scale: float = 1.0
    base: Optional[dict] = None

    #: The teachers' objectives this student can learn from.
    teachers: ClassVar[tuple[str, ...]] = BASES

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or int(self.steps) != self.steps or int(self.steps) < 1:
            raise ValueError(f"objective.steps={self.steps!r} must be a whole number of steps >= 1")
        self.steps = int(self.steps)
        if not math.isfinite(float(self.guidance_scale)) or float(self.guidance_scale) < 0:
            raise ValueError(f"objective.guidance_scale={self.guidance_scale} must be a number >= 0 (1: no guidance)")
        self.base = dict(self.base or {"name": "vp"})  # students written before objective.base: VP teachers
        if self.base.get("name", "vp") not in BASES:
            raise ValueError(
                f"objective.base.name={self.base.get('name')!r}: a student is read on the path of one of "
                f"{list(BASES)} (the objective of the first teacher it was distilled from)"
            )
        self.base_objective = build_objective_from(self.base)
        self._teacher: Optional[Teacher] = None

    @property
    def teacher_run(self) -> Teacher:
        if self._teacher is None:
            teacher = Teacher(self.teacher)
            self.check_teacher(teacher)
            self._teacher = teacher
        return self._teacher

    def check_teacher(self, teacher: Teacher) -> None:
        """Refuse a teacher trained with an objective this student cannot learn from; say when the student cannot
        start as its teacher (an ``eps`` teacher's student learns ``v``)."""
        name = (teacher.config.get("objective") or {}).get("name") or "vp"
        if name == "vp" and self.base.get("prediction", "eps") == "eps":
            log.warning(
                "objective.teacher=%s predicts eps, which gives no clean estimate at pure noise: its student learns "
                "v-prediction and starts away from the teacher, so give it more steps (trainer.max_steps), or "
                "distil a teacher trained with objective.prediction=v",
                teacher.path,
            )
        if name not in self.teachers:
            kind = type(self).__name__
            raise ValueError(
                f"objective.teacher={teacher.path} was trained with objective {name!r}: {kind} learns from "
                f"{', '.join(repr(n) for n in self.teachers)} teachers only; distil a run trained with one of them"
            )

    def check_domain(self, domain: Any) -> None:
        self.teacher_run.check_domain(domain)

    def check_schedule(self, schedule: Schedule) -> None:
        self.base_objective.check_schedule(schedule)

    def sampling_schedule(self, schedule: Schedule) -> Schedule:
        """The student's grid on its base objective's path (the recipe's schedule for a VP base)."""
        if isinstance(schedule, StudentGrid):
            return schedule
        return self.grid(self.base_objective.sampling_schedule(schedule))

    def grid(self, path: Schedule) -> StudentGrid:
        """The student's ``steps`` times on its base path ``path``."""
        raise NotImplementedError(f"{type(self).__name__} must implement grid(path)")

    def teacher_denoiser(self, space: Space, cond: Mapping[str, Any], device: torch.device) -> DenoiserFn:
        """The teacher's denoiser on ``space``, with classifier-free guidance at ``guidance_scale`` (Ho & Salimans
        2022), which the student then learns as its own conditional denoiser."""
        teacher = self.teacher_run
        if float(self.guidance_scale) == 1.0:
            return teacher.denoiser(space, cond, device)
        keys = [k for k in teacher.parts.domain.guidance_keys if cond.get(k) is not None]
        if not keys:
            raise ValueError(
                f"objective.guidance_scale={self.guidance_scale} needs a conditional teacher: the run {teacher.path} "
                "has no condition to guide towards; distil it with --guidance 1 (objective.guidance_scale=1)"
            )
        den, uncond = teacher.denoiser(space, cond, device), teacher.denoiser(space, null_condition(cond, keys), device)
        return classifier_free_guidance(den, uncond, float(self.guidance_scale), space, teacher.schedule)

    @staticmethod
    def grid_of(schedule: Schedule) -> StudentGrid:
        if not isinstance(schedule, StudentGrid):
            raise TypeError(f"a distilled student samples on its own grid (a StudentGrid), not on {schedule!r}")
        return schedule

    @property
    def vp_prediction(self) -> str:
        """A VP student's parameterisation: its teacher's ``v`` or ``x0``; ``v`` for an ``eps`` teacher, whose
        clean estimate is undefined at pure noise (Salimans & Ho 2022, sec. 4)."""
        kind = self.base.get("prediction", "eps")
        return kind if kind in ("v", "x0") else "v"

    def student_denoiser(self, net: Callable[..., Tensor], grid: StudentGrid, space: Space, cond: dict) -> DenoiserFn:
        """The student's ``(x0, eps)`` at student times: ``net`` called at the base path's time of each, read as
        :attr:`vp_prediction` on a VP path, else as its base objective reads its network (a velocity, EDM's ``D``)."""
        if self.base.get("name", "vp") == "vp":
            kind = self.vp_prediction

            def vp_denoise(x_t: Tensor, t: Tensor) -> Any:
                alpha, sigma = grid.alpha_sigma(t, dtype=x_t.dtype)
                out = checked_output(net(x_t, grid.base_time(t).to(x_t.dtype), **cond), x_t).to(x_t.dtype)
                return to_prediction(kind, out, x_t, space.expand(alpha), space.expand(sigma))

            return vp_denoise
        base = self.base_objective.denoiser(net, grid.base, space, cond)
        return lambda x_t, t: base(x_t, grid.base_time(t).to(x_t.dtype))


@register_objective("progressive")
@dataclass
class ProgressiveObjective(StudentObjective):
    """One round of progressive distillation (Salimans & Ho 2022, Alg. 2): a student of ``steps`` DDIM steps
    regresses, at each of its grid times, the target of two DDIM steps of its ``2 * steps``-step teacher, with
    the "SNR + 1" weighting (a plain v-prediction loss, Sec. 4 of the paper)."""

    teachers: ClassVar[tuple[str, ...]] = (*BASES, "progressive")

    def check_teacher(self, teacher: Teacher) -> None:
        super().check_teacher(teacher)
        have, want = teacher.schedule.num_steps, 2 * self.steps
        if teacher.config["objective"].get("name") == "progressive" and have != want:
            raise ValueError(
                f"objective.steps={self.steps} halves a teacher of {want} steps, but the teacher {teacher.path} "
                f"samples in {have}: set objective.steps={have // 2} (each round halves the steps)"
            )
        if have is not None and have < want:
            raise ValueError(
                f"objective.steps={self.steps} halves {want} teacher steps, but the teacher {teacher.path} has "
                f"{have} trained steps: start from at most {have} (polydiff distill --teacher-steps)"
            )

    def grid(self, path: Schedule) -> StudentGrid:
        """The base path at the student's ``steps`` trailing times (the DDIM grid it samples on)."""
        if path.num_steps is not None and path.num_steps < self.steps:
            raise ValueError(f"objective.steps={self.steps} exceeds the schedule's {path.num_steps} steps")
        times = timesteps(self.steps, path.num_steps, "trailing")[:-1].flip(0)  # [N] ascending
        return StudentGrid(path, times, name=f"{path.name}@{self.steps}")

    def denoiser(
        self, net: Callable[..., Tensor], schedule: Schedule, space: Space, cond: Optional[dict] = None
    ) -> DenoiserFn:
        """The student's denoiser on its grid."""
        return self.student_denoiser(net, self.grid_of(schedule), space, dict(cond or {}))

    def losses(
        self,
        net: Callable[..., Tensor],
        batch: Batch,
        schedule: Schedule,
        generator: Optional[torch.Generator] = None,
        t: Optional[Tensor] = None,
    ) -> Tensor:
        """Per-sample squared v errors ``[B]`` against the teacher's two-step targets, at grid times ``i / N``: the
        clean-state error over ``sigma^2`` (the "SNR + 1" weight), which is the v error for any parameterisation."""
        grid, space, x0 = self.grid_of(schedule), batch.space, batch.x
        n, device = grid.num_steps, x0.device
        if t is None:
            gdev = generator.device if generator is not None else device
            t = torch.randint(1, n + 1, (space.num_samples,), generator=generator, device=gdev).to(device) / n
        i = (t.double() * n).round().long()  # [B] student step 1..N
        teacher = self.teacher_run
        tt = timesteps(2 * n, teacher.schedule.num_steps, "trailing").to(device)  # [2N + 1] descending to 0
        k = 2 * (n - i)
        times = torch.stack([tt[k], tt[k + 1], tt[k + 2]])  # [3, B] in the teacher's time
        eps = space.randn(generator=generator, dtype=x0.dtype)
        alpha, sigma = grid.alpha_sigma(t, dtype=torch.float64)  # [B]
        a, s = space.expand(alpha.to(x0.dtype)), space.expand(sigma.to(x0.dtype))
        z = a * x0 + s * eps
        with torch.no_grad():
            den = self.teacher_denoiser(space, batch.cond, device)
            x_target = progressive_target(den, z, times, teacher.schedule, space)
        x0_hat = self.student_denoiser(net, grid, space, dict(batch.cond))(z, t).x0
        return space.mean(((x0_hat.float() - x_target.float()) / s.float()) ** 2)  # x0 = alpha z - sigma v
