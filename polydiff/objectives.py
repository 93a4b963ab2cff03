"""Training objectives: what the network learns, the loss, and the sampler-facing denoiser it defines.

An objective is one class (:class:`BaseObjective`): ``losses`` (per-sample training losses), ``denoiser``
(the network as ``(x_t, t[B]) -> Prediction``) and ``check_schedule`` (what it needs from a schedule),
registered by name with :func:`register_objective` (``objective.name=NAME``; a ``"module:Class"`` name is
imported on demand). Its options (``objective.KEY``) are exactly its constructor's arguments.

``vp`` (:class:`VPObjective`, the default, here) predicts one of these parameterisations of
``x_t = alpha x_0 + sigma eps`` with ``alpha^2 + sigma^2 = 1``:

* eps-prediction (Ho et al. 2020): ``x_0 = (x_t - sigma eps) / alpha``;
* v-prediction (Salimans & Ho 2022): ``v = alpha eps - sigma x_0``, so
  ``x_0 = alpha x_t - sigma v`` and ``eps = sigma x_t + alpha v`` (defined at SNR 0 too);
* x0-prediction: ``eps = (x_t - alpha x_0) / sigma``.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, NamedTuple, Optional

import torch
from torch import Tensor

from .edm import EDMObjective  # registers 'edm'
from .flow import FlowObjective  # registers 'flow'
from .objective_base import (
    OBJECTIVES,
    BaseObjective,
    check_objective_class,
    check_weighting,
    checked_output,
    min_snr_weight,
    register_objective,
)
from .plugins import check_options, lookup, option_params
from .schedules import NoiseSchedule
from .space import Space
from .state import Batch, DenoiserFn, Prediction
from .variance import LearnedVariance, split_output, vlb_terms

__all__ = [
    "Prediction",
    "DenoiserFn",
    "Parameterisation",
    "PARAMETERISATIONS",
    "PREDICTIONS",
    "to_prediction",
    "target_of",
    "loss_weight",
    "BaseObjective",
    "VPObjective",
    "FlowObjective",
    "EDMObjective",
    "Objective",
    "OBJECTIVES",
    "register_objective",
    "get_objective",
    "objective_options",
    "check_objective_options",
    "objective_settings",
    "build_objective_from",
    "ENTRY_POINT_GROUP",
]

ENTRY_POINT_GROUP = "polydiff.objectives"
VARIANCES = ("fixed", "learned")


class Parameterisation(NamedTuple):
    """One network output of :class:`VPObjective`: its regression target, the conversion back to ``(x0, eps)``,
    and the min-SNR-gamma weight in its own space (Hang et al. 2023, eq. 9). alpha, sigma broadcast."""

    target: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]  # (x0, eps, alpha, sigma) -> target
    prediction: Callable[[Tensor, Tensor, Tensor, Tensor], Prediction]  # (out, x_t, alpha, sigma) -> (x0, eps)
    # (snr, gamma) -> weight: the x0-space weight min(SNR, gamma) divided by what this space's loss already
    # carries (SNR for eps, SNR + 1 for v), written so that SNR = 0 needs no division by zero.
    min_snr: Callable[[Tensor, float], Tensor]


# addcmul fuses the scale-and-add: the conversions run once per sampler step on the whole state.
PARAMETERISATIONS: dict[str, Parameterisation] = {
    "eps": Parameterisation(
        target=lambda x0, eps, a, s: eps,
        prediction=lambda out, x_t, a, s: Prediction(torch.addcmul(x_t, s, out, value=-1).div_(a), out),
        min_snr=lambda snr, gamma: gamma / snr.clamp(min=gamma),
    ),
    "v": Parameterisation(
        target=lambda x0, eps, a, s: a * eps - s * x0,
        prediction=lambda out, x_t, a, s: Prediction(
            torch.addcmul(a * x_t, s, out, value=-1), torch.addcmul(s * x_t, a, out)
        ),
        min_snr=lambda snr, gamma: snr.clamp(max=gamma) / (snr + 1),
    ),
    "x0": Parameterisation(
        target=lambda x0, eps, a, s: x0,
        prediction=lambda out, x_t, a, s: Prediction(out, torch.addcmul(x_t, a, out, value=-1).div_(s)),
        min_snr=min_snr_weight,
    ),
}
PREDICTIONS = tuple(PARAMETERISATIONS)


def _parameterisation(kind: str) -> Parameterisation:
    if kind not in PARAMETERISATIONS:
        raise KeyError(f"unknown objective.prediction {kind!r}; choose one of {list(PARAMETERISATIONS)}")
    return PARAMETERISATIONS[kind]


def to_prediction(kind: str, out: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> Prediction:
    """Convert a network output of parameterisation ``kind`` to ``(x0, eps)``; alpha, sigma broadcast."""
    return _parameterisation(kind).prediction(out, x_t, alpha, sigma)


def target_of(kind: str, x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """The regression target of parameterisation ``kind``."""
    return _parameterisation(kind).target(x0, eps, alpha, sigma)


def loss_weight(kind: str, weighting: str, snr: Tensor, gamma: float = 5.0) -> Tensor:
    """Per-sample loss weight; ``min_snr`` is min-SNR-gamma (Hang et al. 2023, eq. 9) in ``kind``'s space."""
    check_weighting(weighting, gamma)
    if weighting == "uniform":
        return torch.ones_like(snr)
    return _parameterisation(kind).min_snr(snr, gamma)


#: Objectives in modules above this one (they load runs, or train a first stage): imported on first use.
LATER = {
    "reflow": "polydiff.reflow:ReflowObjective",
    "progressive": "polydiff.distill:ProgressiveObjective",
    "consistency": "polydiff.consistency:ConsistencyObjective",
    "autoencoder": "polydiff.autoencoder:AutoencoderObjective",
}


def get_objective(name: str) -> type[BaseObjective]:
    """The objective class registered as ``name``, at the ``"module:Class"`` path ``name``, or an entry point's."""
    if name in LATER and name not in OBJECTIVES:
        lookup(OBJECTIVES, "objective", LATER[name], ENTRY_POINT_GROUP, check_objective_class)  # registers it
    return lookup(OBJECTIVES, "objective", name, ENTRY_POINT_GROUP, check_objective_class)


def objective_options(name: str) -> dict[str, Any]:
    """The options of objective ``name`` (its constructor's arguments) with their defaults."""
    return {k: p.default for k, p in option_params(get_objective(name)).items()}


def check_objective_options(name: str, options: Mapping[str, Any], settings: tuple[str, ...] = ("name",)) -> None:
    """Refuse an option objective ``name`` does not take (naming the objectives that do) or of the wrong type."""
    check_options("objective", name, get_objective(name), options, OBJECTIVES, settings=settings)


def objective_settings(section: Mapping[str, Any]) -> dict[str, Any]:
    """An ``objective`` section with its class's defaults filled in: ``{"name": ..., **constructor arguments}``
    (a section without ``name`` is ``vp``, as every config written before objectives had names)."""
    given = dict(section or {})
    name = given.pop("name", None) or "vp"
    defaults = {k: v for k, v in objective_options(name).items() if v is not inspect.Parameter.empty}
    return {"name": name, **defaults, **given}


def build_objective_from(section: Mapping[str, Any]) -> BaseObjective:
    """The objective an ``objective`` section names, its options checked against the class's constructor."""
    options = dict(section or {})
    name = options.pop("name", None) or "vp"
    check_objective_options(name, options)
    return get_objective(name)(**options)


@register_objective("vp")
@dataclass
class VPObjective(BaseObjective):
    """The variance-preserving denoising objective: a parameterisation (``eps``, ``v`` or ``x0``, see
    :data:`PARAMETERISATIONS`), uniform or min-SNR-gamma loss weighting (Hang et al. 2023), and times drawn
    uniformly over the schedule's trained steps (Ho et al. 2020, Algorithm 1).

    ``variance="learned"`` is Improved DDPM's hybrid objective (Nichol & Dhariwal 2021, sec. 3.1): the network is
    wrapped with a per-element head (:class:`polydiff.variance.LearnedVariance`) whose ``v`` sets the reverse step's
    variance ``exp(v log beta + (1 - v) log beta~)``, and the loss is ``L_simple + vlb_weight L_vlb``, ``L_vlb`` the
    one-term estimate ``T L_{i-1}`` (bits per element) with the mean's gradient stopped."""

    prediction: str = "eps"
    weighting: str = "uniform"
    gamma: float = 5.0
    variance: str = "fixed"
    vlb_weight: float = 0.001

    def __post_init__(self) -> None:
        self._kind = _parameterisation(self.prediction)
        if self.variance not in VARIANCES:
            raise KeyError(f"unknown objective.variance {self.variance!r}; choose one of {list(VARIANCES)}")
        if self.variance == "learned" and not (math.isfinite(self.vlb_weight) and self.vlb_weight > 0):
            raise ValueError(
                f"objective.vlb_weight={self.vlb_weight} must be a finite number > 0 with objective.variance=learned "
                "(the weight of L_vlb, which alone trains the variance; Improved DDPM's is 0.001)"
            )
        if self.variance == "fixed" and self.vlb_weight != 0.001:
            raise ValueError(
                f"objective.vlb_weight={self.vlb_weight} weighs the learned variance's L_vlb, which "
                "objective.variance=fixed does not have: set objective.variance=learned, or remove vlb_weight"
            )
        check_weighting(self.weighting, self.gamma)

    def sample_t(
        self, n: int, schedule: NoiseSchedule, device: torch.device, generator: Optional[torch.Generator]
    ) -> Tensor:
        """Per-sample training times ``[B]``: uniform over the trained steps ``i / T``, ``i = 1..T``."""
        gdev = generator.device if generator is not None else device
        i = torch.randint(1, schedule.num_steps + 1, (n,), generator=generator, device=gdev).to(device)
        return schedule.timestep_to_t(i).float()

    def losses(
        self,
        net: Callable[..., Tensor],
        batch: Batch,
        schedule: NoiseSchedule,
        generator: Optional[torch.Generator] = None,
        t: Optional[Tensor] = None,
    ) -> Tensor:
        """Weighted per-sample losses ``[B]``, each a mean over the sample's valid elements."""
        space, x0 = batch.space, batch.x
        given = t is not None
        if t is None:
            t = self.sample_t(space.num_samples, schedule, x0.device, generator)
        eps = space.randn(generator=generator, dtype=x0.dtype)
        alpha, sigma = schedule.alpha_sigma(t, dtype=x0.dtype)  # [B]
        a, s = space.expand(alpha), space.expand(sigma)
        x_t = a * x0 + s * eps
        if self.variance == "learned":
            return self._hybrid_losses(net, batch, schedule, t, x_t, eps, a, s, check=given)
        out = checked_output(net(x_t, t, **batch.cond), x_t)
        target = self._kind.target(x0, eps, a, s)
        per_sample = space.mean((out.float() - target.float()) ** 2)  # [B]
        weight = loss_weight(self.prediction, self.weighting, schedule.snr(t).float(), self.gamma)
        return per_sample * weight

    def _hybrid_losses(self, net, batch, schedule, t, x_t, eps, a, s, check) -> Tensor:
        """``L_simple + vlb_weight T L_{i-1} / log 2`` per sample ``[B]`` (Nichol & Dhariwal 2021, eq. 16; improved
        -diffusion's bits and ``T / 1000`` scaling at the paper's weight 0.001); the weighting reads L_simple only."""
        space, x0 = batch.space, batch.x
        out, v = split_output(net(x_t, t, t_elements=space.expand(t), **batch.cond), x_t)
        target = self._kind.target(x0, eps, a, s)
        simple = space.mean((out.float() - target.float()) ** 2)  # [B]
        simple = simple * loss_weight(self.prediction, self.weighting, schedule.snr(t).float(), self.gamma)
        a32, s32, x_t32 = a.float(), s.float(), x_t.float()
        x0_hat = self._kind.prediction(out.detach().float(), x_t32, a32, s32).x0  # stop-gradient on the mean
        vlb = vlb_terms(x0.float(), x0_hat, v.float(), t, schedule, space, check)  # [B], nats per element
        return simple + self.vlb_weight * schedule.num_steps * vlb / math.log(2)

    def wrap_network(self, net: Any) -> Any:
        """The domain's network with the learned variance's head (:class:`LearnedVariance`), or ``net`` itself."""
        return LearnedVariance(net) if self.variance == "learned" else net

    def check_schedule(self, schedule: NoiseSchedule) -> None:
        """Refuse an eps-prediction on a zero-terminal-SNR schedule (Lin et al. 2024, sec. 3.2): x0 = (x_t - sigma eps)
        / alpha divides by alpha = 0 at t = 1, and every sample would be NaN; and a learned variance on a schedule
        without trained steps (beta and beta~ are those of a step of the trained grid)."""
        if self.variance == "learned" and (schedule.num_steps is None or schedule.num_steps < 2):
            raise ValueError(
                f"objective.variance=learned needs a schedule of trained steps (at least 2), not {schedule!r}: the "
                "variance interpolates each step's beta and beta~; use a tabulated schedule (schedule.name=linear or "
                "cosine with schedule.steps) or objective.variance=fixed"
            )
        if self.prediction == "eps" and float(schedule.alpha_bar_table[-1]) == 0.0:
            raise ValueError(
                "a zero-terminal-SNR schedule (schedule.zero_terminal_snr=true) needs prediction 'v' or "
                "'x0' (objective.prediction=v): an eps-prediction cannot recover x0 where the signal is "
                "exactly zero"
            )

    def denoiser(
        self, net: Callable[..., Tensor], schedule: NoiseSchedule, space: Space, cond: Optional[dict] = None
    ) -> DenoiserFn:
        """The sampler-facing denoiser ``(x_t, t[B]) -> Prediction`` of ``net`` under this objective."""
        cond = dict(cond or {})
        convert = self._kind.prediction
        self.check_schedule(schedule)

        def denoise(x_t: Tensor, t: Tensor) -> Prediction:
            alpha, sigma = schedule.alpha_sigma(t, dtype=x_t.dtype)
            out = checked_output(net(x_t, t.to(x_t.dtype), **cond), x_t)
            return convert(out.to(x_t.dtype), x_t, space.expand(alpha), space.expand(sigma))

        def denoise_learned(x_t: Tensor, t: Tensor) -> Prediction:
            alpha, sigma = schedule.alpha_sigma(t, dtype=x_t.dtype)
            tt = t.to(x_t.dtype)
            out, v = split_output(net(x_t, tt, t_elements=space.expand(tt), **cond), x_t)
            pred = convert(out.to(x_t.dtype), x_t, space.expand(alpha), space.expand(sigma))
            return Prediction(pred.x0, pred.eps, v.to(x_t.dtype))

        return denoise_learned if self.variance == "learned" else denoise


#: The name of :class:`VPObjective` before objectives had a registry (``Objective(prediction="v")``).
Objective = VPObjective
