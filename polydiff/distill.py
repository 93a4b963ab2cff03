"""Few-step students of a trained run: the time grid they learn on, and progressive distillation (``progressive``).

Progressive distillation (Salimans & Ho 2022, Alg. 2): a v-prediction student learns to take in one DDIM step what
its teacher takes in two. One round halves the step count; ``polydiff distill --method progressive`` runs the rounds
as runs of their own, each round's student teaching the next. Consistency distillation (:mod:`polydiff.consistency`)
shares the grid and the teacher handling kept here.

A student's schedule is a :class:`StudentGrid`: the teacher's schedule read at the student's ``N`` times, as ``N``
trained steps ``i / N``. Samplers therefore step exactly on the grid the student learnt, a ``sampler.steps`` above
``N`` is refused by the samplers' own check, and the network still sees the teacher's time, so a student starts
from its teacher's weights as the same function.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping, Optional

import torch
from torch import Tensor

from .conditioning import null_condition
from .guidance import classifier_free_guidance
from .objective_base import BaseObjective, checked_output, register_objective
from .objectives import to_prediction
from .sampling import timesteps
from .schedules import NoiseSchedule, Schedule
from .space import Space
from .state import Batch, DenoiserFn
from .teacher import Teacher

__all__ = ["StudentGrid", "StudentObjective", "ProgressiveObjective", "progressive_target", "ddim_step"]


class StudentGrid(NoiseSchedule):
    """A student's schedule: ``base`` read at ``times`` (``N`` ascending times in (0, 1] of ``base``) as ``N`` trained
    steps ``i / N``; :meth:`base_time` maps a student time back to ``base``'s, which the network sees."""

    def __init__(self, base: Schedule, times: Tensor, name: str) -> None:
        times = torch.as_tensor(times, dtype=torch.float64).flatten()  # [N]
        super().__init__(base.alpha_bar(times), name=name)
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
    without it), checked against the objectives it can learn from; the teacher's denoiser, guided at a fixed
    ``guidance_scale`` when not 1 (classifier-free guidance, distilled into the student); ``steps`` of its grid."""

    teacher: str = ""
    steps: int = 4
    guidance_scale: float = 1.0

    #: The teachers' objectives this student can learn from.
    teachers: ClassVar[tuple[str, ...]] = ("vp",)

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or int(self.steps) != self.steps or int(self.steps) < 1:
            raise ValueError(f"objective.steps={self.steps!r} must be a whole number of steps >= 1")
        self.steps = int(self.steps)
        if not math.isfinite(float(self.guidance_scale)) or float(self.guidance_scale) < 0:
            raise ValueError(f"objective.guidance_scale={self.guidance_scale} must be a number >= 0 (1: no guidance)")
        self._teacher: Optional[Teacher] = None

    @property
    def teacher_run(self) -> Teacher:
        if self._teacher is None:
            teacher = Teacher(self.teacher)
            self.check_teacher(teacher)
            self._teacher = teacher
        return self._teacher

    def check_teacher(self, teacher: Teacher) -> None:
        """Refuse a teacher trained with an objective this student cannot learn from."""
        name = (teacher.config.get("objective") or {}).get("name") or "vp"
        if name not in self.teachers:
            kind = type(self).__name__
            raise ValueError(
                f"objective.teacher={teacher.path} was trained with objective {name!r}: {kind} learns from "
                f"{' or '.join(repr(n) for n in self.teachers)} teachers only (variance-preserving DDIM steps on the "
                "teacher's own grid); distil a run trained with objective.name=vp"
            )

    def check_domain(self, domain: Any) -> None:
        self.teacher_run.check_domain(domain)

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

    def student_net(self, net: Callable[..., Tensor], grid: StudentGrid) -> Callable[..., Tensor]:
        """``net`` called at the teacher's time of each student time (its weights start as the teacher's)."""
        return lambda x, t, **cond: checked_output(net(x, grid.base_time(t).to(x.dtype), **cond), x)


@register_objective("progressive")
@dataclass
class ProgressiveObjective(StudentObjective):
    """One round of progressive distillation (Salimans & Ho 2022, Alg. 2): a v-prediction student of ``steps`` DDIM
    steps regresses, at each of its grid times, the target of two DDIM steps of its ``2 * steps``-step teacher, with
    the "SNR + 1" weighting (a plain v-prediction loss, Sec. 4 of the paper)."""

    teachers: ClassVar[tuple[str, ...]] = ("vp", "progressive")

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

    def sampling_schedule(self, schedule: Schedule) -> Schedule:
        """The teacher's schedule at the student's ``steps`` trailing times (the DDIM grid it samples on)."""
        if isinstance(schedule, StudentGrid):
            return schedule
        if schedule.num_steps is not None and schedule.num_steps < self.steps:
            raise ValueError(f"objective.steps={self.steps} exceeds the schedule's {schedule.num_steps} steps")
        times = timesteps(self.steps, schedule.num_steps, "trailing")[:-1].flip(0)  # [N] ascending
        return StudentGrid(schedule, times, name=f"{schedule.name}@{self.steps}")

    def denoiser(
        self, net: Callable[..., Tensor], schedule: Schedule, space: Space, cond: Optional[dict] = None
    ) -> DenoiserFn:
        """The student as a v-prediction denoiser on its grid."""
        grid, cond = self.grid_of(schedule), dict(cond or {})
        student = self.student_net(net, grid)

        def denoise(x_t: Tensor, t: Tensor) -> Any:
            alpha, sigma = grid.alpha_sigma(t, dtype=x_t.dtype)
            out = student(x_t, t, **cond).to(x_t.dtype)
            return to_prediction("v", out, x_t, space.expand(alpha), space.expand(sigma))

        return denoise

    def losses(
        self,
        net: Callable[..., Tensor],
        batch: Batch,
        schedule: Schedule,
        generator: Optional[torch.Generator] = None,
        t: Optional[Tensor] = None,
    ) -> Tensor:
        """Per-sample squared v errors ``[B]`` against the teacher's two-step targets, at grid times ``i / N``."""
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
            v_target = (a * z - x_target) / s  # x0 = alpha z - sigma v
        out = self.student_net(net, grid)(z, t, **batch.cond)
        return space.mean((out.float() - v_target.float()) ** 2)
