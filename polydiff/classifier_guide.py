"""Classifier guidance from a classifier run (``guidance.classifier=RUN``): the run loaded, checked against the model
it guides, and turned into a denoiser wrapper (:func:`polydiff.guidance.classifier_guidance`) for every sampler.

A label classifier steers towards each sample's label (``label=NAME``); a property regressor (molecules) towards
``guidance.target`` (in the units of ``prior.KEY``, e.g. Bohr^3 for ``alpha``) or the model's own condition, by
``-scale grad ||f(x_t, t) - target||^2`` (EEGSDE's energy guidance, Bao et al. 2023): the gradient of an invariant
regressor is equivariant. The classifier reads the model's state at the time of its own schedule with the same
noise-to-signal ratio, so a classifier of one schedule guides a model of another.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import Tensor, nn

from .classifier import ClassifierObjective
from .conditioning import is_null
from .domain import Domain
from .guidance import CLASSIFIER_INTERVAL, check_classifier_scale, check_interval, classifier_guidance
from .schedules import Schedule
from .space import Space
from .state import DenoiserFn

__all__ = ["ClassifierGuide", "load_classifier_guide", "classifier_metrics"]

log = logging.getLogger(__name__)


@dataclass
class ClassifierGuide:
    """A loaded classifier run and what it steers towards."""

    objective: ClassifierObjective
    net: nn.Module
    schedule: Schedule  # the classifier's own
    key: str
    regressor: bool
    scale: float
    target: Optional[Tensor] = None  # a regressor's target in the units its batches carry, or None: the model's
    interval: Optional[tuple[float, float]] = CLASSIFIER_INTERVAL  # noise levels sigma / alpha where it acts

    def wrap(self, denoiser: DenoiserFn, schedule: Schedule, space: Space, cond: Mapping[str, Any]) -> DenoiserFn:
        """``denoiser`` guided by the classifier for a chunk of layout ``space`` and conditions ``cond``."""
        n = space.num_samples
        given = cond.get(self.key)
        if self.regressor:
            if self.target is not None:
                target = self.target.to(space.device).reshape(1, -1)[:, :1].expand(n, 1)
            elif isinstance(given, Tensor) and not bool(is_null(given).any()):
                target = given.reshape(n, -1)[:, :1]
            else:
                raise ValueError(
                    f"guidance.classifier is a regressor of {self.key!r}: give guidance.target=VALUE, the property "
                    "value to steer towards (in the units of prior.KEY)"
                )
        else:
            if not isinstance(given, Tensor) or bool(is_null(given).any()):
                raise ValueError("guidance.classifier is a label classifier: give label=NAME, the class to steer to")
            target = given
        ccond = {**cond, self.key: target}

        def log_prob(x: Tensor, t: Tensor) -> Tensor:
            ab = schedule.alpha_bar(t)  # the classifier's time at the same noise-to-signal ratio
            t_cls = self.schedule.t_at_sigma(((1 - ab) / ab).sqrt()).to(x.device, x.dtype)
            flat = target.reshape(n, -1)[:, 0]
            return self.objective.log_prob(self.net, x, t_cls, space, ccond, flat)

        return classifier_guidance(denoiser, log_prob, self.scale, space, schedule, self.interval)


def _know_classes(objective: ClassifierObjective, domain: Domain) -> None:
    """A loaded classifier's number of classes (``objective.classes=0`` counts them in training): its domain's."""
    if not objective.classes and domain.num_classes:
        objective.classes = domain.num_classes


def _describe(domain: Domain) -> str:
    return f"{domain.name or type(domain).__name__!r} ({type(domain).__qualname__})"


def load_classifier_guide(
    guidance: Mapping[str, Any], domain: Domain, device: torch.device | str
) -> Optional[ClassifierGuide]:
    """The guide ``guidance.classifier`` names (None when it names none), checked against the model's ``domain``."""
    from .build import load_run  # assembly: loading a run builds its parts

    path = guidance.get("classifier")
    if not path:
        return None
    scale = check_classifier_scale(guidance.get("classifier_scale", 1.0))
    interval = check_interval(guidance.get("classifier_interval", CLASSIFIER_INTERVAL), "guidance.classifier_interval")
    if not Path(path).exists():
        raise FileNotFoundError(f"guidance.classifier={path}: no such run folder or checkpoint")
    parts, ckpt = load_run(path, "ema", device)
    objective = parts.objective
    if not isinstance(objective, ClassifierObjective):
        raise ValueError(
            f"guidance.classifier={path} is a run of objective {ckpt['config']['objective'].get('name', 'vp')!r}, not "
            "a classifier: train one with polydiff train RECIPE objective.name=classifier hydra.run.dir=CLS"
        )
    cls_domain = parts.domain
    if type(cls_domain) is not type(domain):
        raise ValueError(
            f"guidance.classifier={path} was trained on domain {_describe(cls_domain)}, this model on "
            f"{_describe(domain)}: train the classifier on the model's recipe"
        )
    if cls_domain.sample_shape != domain.sample_shape:
        raise ValueError(
            f"guidance.classifier={path} was trained on samples of shape {cls_domain.sample_shape}, this model draws "
            f"{domain.sample_shape}: train the classifier with the model's domain settings"
        )
    key = ckpt["config"]["objective"].get("key", "auto")
    key = "label" if key == "auto" and cls_domain.num_classes else key
    regressor = key != "label"
    if regressor and key == "auto":
        key = cls_domain.guidance_keys[0]
    if not regressor:
        if cls_domain.class_names != domain.class_names:
            raise ValueError(
                f"guidance.classifier={path} knows the labels {cls_domain.class_names}, this model "
                f"{domain.class_names}: train the classifier on the model's label set"
            )
        _know_classes(objective, cls_domain)
    own, theirs = getattr(domain, "condition_on", None), getattr(cls_domain, "condition_on", None)
    if regressor and own is not None and own != theirs:
        raise ValueError(
            f"guidance.classifier={path} predicts {theirs!r}, this model is conditioned on {own!r}: give a regressor "
            f"of {own!r}, or guide an unconditional model"
        )
    target = guidance.get("target")
    if target is not None:
        if not regressor:
            raise ValueError("guidance.target is the value a property regressor steers to; this classifier has labels")
        if not math.isfinite(float(target)):
            raise ValueError(f"guidance.target={target} must be a finite number")
        try:  # read in the units of prior.KEY, as the classifier's domain normalises them
            target = cls_domain.prior(1, device="cpu", **{key: float(target)})[1][key].reshape(-1)[:1].float()
        except (KeyError, TypeError) as err:
            raise ValueError(f"guidance.target: domain {_describe(cls_domain)} takes no prior.{key} ({err})") from None
    parts.net.eval().requires_grad_(False)
    return ClassifierGuide(objective, parts.net, parts.schedule, key, regressor, scale, target, interval)


@torch.no_grad()
def classifier_metrics(
    objective: ClassifierObjective,
    net: nn.Module,
    domain: Domain,
    schedule: Schedule,
    n: int,
    device: torch.device | str,
    generator: Optional[torch.Generator] = None,
) -> dict[str, float]:
    """A classifier run's accuracy or error against ``t`` on held-out data (:meth:`ClassifierObjective.score`)."""
    _know_classes(objective, domain)
    return objective.score(net, domain, schedule, n, device, generator)
