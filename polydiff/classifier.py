"""Noise-aware classifiers and regressors (``objective.name=classifier``) for classifier guidance.

Dhariwal & Nichol 2021 (sec. 4.1) train a classifier ``p(y | x_t)`` on noised data at random times; here the network
is the domain's own, unchanged, read out by the space: the mean of its output over the sample's valid elements (for a
ragged state, over the columns that are not kept at zero mean, the invariant features of a molecule, so the readout is
invariant when the network is equivariant). A class label ``y`` is one of the network's conditions, so the logit of
class ``k`` is that readout with the condition set to ``k``: one network call on ``K`` stacked copies of a dense
batch (``K`` calls for other layouts), a conditional energy trained by cross-entropy. A float condition (a molecule's
property) makes a regressor: the readout under the null condition, trained by squared error towards the condition's
value in the units the domain's batches carry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .conditioning import is_null, null_like
from .objective_base import BaseObjective, checked_output, register_objective
from .schedules import Schedule
from .space import DenseSpace, Space
from .state import Batch, DenoiserFn

__all__ = ["ClassifierObjective", "pooled", "noised_at"]

TIMES = (0.1, 0.3, 0.5, 0.7, 0.9)  # where a classifier run's held-out accuracy is read


def pooled(out: Tensor, space: Space) -> Tensor:
    """Per-sample mean ``[B]`` of a network output over valid elements, leaving out zero-mean (equivariant) columns."""
    centered = tuple(getattr(space, "centered", ()))
    if not centered:
        return space.mean(out)
    keep = torch.ones(out.shape[-1], dtype=out.dtype, device=out.device)
    keep[list(centered)] = 0
    atoms = space.count().to(out.dtype) / out.shape[-1]
    return space.sum(out * keep) / (atoms * keep.sum()).clamp(min=1)


def noised_at(x0: Tensor, space: Space, schedule: Schedule, t: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    """``x_t = alpha x_0 + sigma eps`` in variance-preserving coordinates at per-sample ``t [B]``."""
    alpha, sigma = schedule.alpha_sigma(t, dtype=x0.dtype)
    return space.expand(alpha) * x0 + space.expand(sigma) * space.randn(generator=generator, dtype=x0.dtype)


@register_objective("classifier")
@dataclass
class ClassifierObjective(BaseObjective):
    """A time-conditioned classifier of condition ``key`` (``auto``: ``label``, else the one float condition) over
    ``classes`` classes (0: the largest label seen in training, plus one), trained on ``x_t`` at uniform times."""

    key: str = "auto"
    classes: int = 0

    #: What ``polydiff eval --nll`` says of such a run.
    likelihood_undefined = (
        "--nll is not defined for a classifier run (objective.name=classifier): it models p(y | x_t), not the data; "
        "give a run of a generative objective (vp, flow, edm)"
    )

    def __post_init__(self) -> None:
        if self.classes < 0:
            raise ValueError(f"objective.classes={self.classes} must be >= 0 (0: as many as the training labels)")
        self._seen = 0

    def target_key(self, cond: dict) -> str:
        """The condition this objective predicts."""
        if self.key != "auto":
            if self.key not in cond:
                raise KeyError(f"objective.key={self.key!r} is not a condition of these batches: {sorted(cond)}")
            return self.key
        if "label" in cond:
            return "label"
        floats = [k for k, v in cond.items() if isinstance(v, Tensor) and v.is_floating_point()]
        if len(floats) != 1:
            raise ValueError(
                f"objective 'classifier' needs a label or one float property among the batches' conditions "
                f"{sorted(cond)} (e.g. domain.condition_on=alpha for molecules); name it with objective.key=KEY"
            )
        return floats[0]

    def num_classes(self) -> int:
        return self.classes or self._seen

    def sample_t(self, n: int, schedule: Schedule, device: torch.device, gen: Optional[torch.Generator]) -> Tensor:
        """Uniform over the trained steps ``i / T`` (or over (0, 1] in continuous time)."""
        where = gen.device if gen is not None else device
        if schedule.num_steps is None:
            return (1 - torch.rand(n, generator=gen, device=where)).to(device)
        i = torch.randint(1, schedule.num_steps + 1, (n,), generator=gen, device=where).to(device)
        return schedule.timestep_to_t(i).float()

    def readout(self, net: Callable[..., Tensor], x_t: Tensor, t: Tensor, space: Space, cond: dict) -> Tensor:
        """Logits ``[B, K]`` of a label classifier, or predictions ``[B]`` of a regressor."""
        key = self.target_key(cond)
        value = cond[key]
        if value.is_floating_point():
            return pooled(checked_output(net(x_t, t, **{**cond, key: null_like(value)}), x_t), space)
        k = self.num_classes()
        if k < 1:
            raise ValueError("objective 'classifier' has seen no labels: set objective.classes=K")
        n = space.num_samples
        per_sample = all(not isinstance(v, Tensor) or (v.dim() > 0 and v.shape[0] == n) for v in cond.values())
        if isinstance(space, DenseSpace) and per_sample:  # one call on the K copies stacked: [K B, ...]
            reps = lambda v: v.repeat(k, *([1] * (v.dim() - 1))) if isinstance(v, Tensor) else v  # noqa: E731
            stacked = {name: reps(v) for name, v in cond.items()}
            stacked[key] = torch.arange(k, device=value.device).repeat_interleave(n).to(value.dtype)
            xs = reps(x_t)
            out = checked_output(net(xs, reps(t), **stacked), xs)
            return pooled(out, type(space).cat([space] * k)).reshape(k, n).T  # [B, K]
        logits = [
            pooled(checked_output(net(x_t, t, **{**cond, key: torch.full_like(value, c)}), x_t), space)
            for c in range(k)
        ]
        return torch.stack(logits, dim=1)

    def losses(
        self,
        net: Callable[..., Tensor],
        batch: Batch,
        schedule: Schedule,
        generator: Optional[torch.Generator] = None,
        t: Optional[Tensor] = None,
    ) -> Tensor:
        """Cross-entropy (labels) or squared error (a property) per sample ``[B]``; 0 where the target is null
        (label dropout)."""
        space, x0, key = batch.space, batch.x, self.target_key(batch.cond)
        target = batch.cond[key]
        if not target.is_floating_point() and not self.classes:
            self._seen = max(self._seen, int(target.max()) + 1)
        if t is None:
            t = self.sample_t(space.num_samples, schedule, x0.device, generator)
        x_t = noised_at(x0, space, schedule, t, generator)
        out = self.readout(net, x_t, t.to(x0.dtype), space, batch.cond)
        valid = ~is_null(target)
        if target.is_floating_point():
            per = (out.float() - torch.nan_to_num(target.reshape(len(out), -1)[:, 0].float())) ** 2
        else:
            if bool((target >= out.shape[1]).any()):
                raise ValueError(f"label {int(target.max())} >= objective.classes={out.shape[1]}: raise it")
            per = F.cross_entropy(out.float(), target.clamp(min=0), reduction="none")  # null (-1) rows masked below
        return torch.where(valid, per, torch.zeros_like(per))

    def check_domain(self, domain: Any) -> None:
        """A label classifier's number of classes, where ``objective.classes`` leaves it open: its domain's."""
        if not self.classes and getattr(domain, "num_classes", 0):
            self._seen = int(domain.num_classes)

    @torch.no_grad()
    def score(
        self,
        net: Callable[..., Tensor],
        domain: Any,
        schedule: Schedule,
        n: int,
        device: Any,
        generator: Optional[torch.Generator] = None,
        times: tuple[float, ...] = TIMES,
    ) -> dict[str, float]:
        """Accuracy (labels) or mean absolute error (a property, in the units its batches carry) on ``n`` held-out
        samples noised to each of ``times``: ``accuracy_t0.1`` ... (what a classifier run logs instead of samples)."""
        self.check_domain(domain)
        data = domain.dataset("test")
        n = min(n, len(data))
        batch = domain.collate([data[i] for i in range(n)]).to(device)
        target = batch.cond[self.target_key(batch.cond)]
        valid = ~is_null(target)
        metrics: dict[str, float] = {}
        was_training = getattr(net, "training", False)
        if was_training:
            net.eval()
        try:
            for t_value in times:
                t = torch.full((n,), t_value, device=device)
                x_t = noised_at(batch.x, batch.space, schedule, t, generator)
                out = self.readout(net, x_t, t, batch.space, batch.cond)
                if out.dim() == 1:
                    metrics[f"mae_t{t_value:g}"] = float((out - target.reshape(n, -1)[:, 0]).abs()[valid].mean())
                else:
                    metrics[f"accuracy_t{t_value:g}"] = float((out.argmax(1) == target)[valid].float().mean())
        finally:
            if was_training:
                net.train()
        return metrics

    def denoiser(
        self, net: Callable[..., Tensor], schedule: Schedule, space: Space, cond: Optional[dict] = None
    ) -> DenoiserFn:
        raise ValueError(
            "a classifier run (objective.name=classifier) draws no samples: use it to guide a generative run, "
            "polydiff sample RUN guidance.classifier=THIS_RUN guidance.classifier_scale=S"
        )

    def log_prob(
        self, net: Callable[..., Tensor], x_t: Tensor, t: Tensor, space: Space, cond: dict, target: Tensor
    ) -> Tensor:
        """``log p(y | x_t)`` per sample ``[B]`` for labels ``target [B]``, or ``-(f(x_t) - target)^2`` for a
        regressor (Gaussian with variance 1/2): what classifier guidance differentiates."""
        out = self.readout(net, x_t, t, space, cond)
        if out.dim() == 1:
            return -((out - target.to(out.dtype)) ** 2)
        return torch.log_softmax(out, dim=1).gather(1, target.long().clamp(min=0)[:, None])[:, 0]
