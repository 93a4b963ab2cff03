"""Score samples made anywhere (this toolkit, another model, a paper's release) with a domain's metrics.

``polydiff eval SOURCE SAMPLES...``: the domain comes from a run directory (its checkpoint's
config and data state, as ``polydiff sample`` builds it) or from a recipe (set up from its
training data); each ``SAMPLES`` path is read by :meth:`polydiff.Domain.read_samples` and scored
by :meth:`~polydiff.Domain.evaluate`, beside the same metrics for real held-out data. Both are the
domain's outputs hooks (:class:`polydiff.outputs.Outputs`), called through the domain so that one
which overrides them itself is scored the same way.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

from .build import build_domain, saved_config, to_plain, with_domain_overrides
from .domain import Domain

__all__ = ["load_domain", "score_samples"]

log = logging.getLogger(__name__)


def load_domain(source: str | Path, overrides: Sequence[str] = ()) -> tuple[Domain, dict[str, Any]]:
    """The domain of a run directory or recipe, and the config it was built from.

    ``overrides`` are ``domain.KEY=V`` settings (e.g. where the training data now lies).
    """
    from .checkpoint import load_checkpoint, run_checkpoint

    source = Path(source)
    state = None
    if source.suffix in (".yaml", ".yml"):
        from .recipes import compose_recipe

        cfg = to_plain(compose_recipe(source))
    else:
        ckpt_path = run_checkpoint(source)
        if not ckpt_path.is_file():
            raise FileNotFoundError(
                f"{source} is neither a recipe (.yaml) nor a run directory with checkpoints/last.pt"
            )
        ckpt = load_checkpoint(ckpt_path, mmap=True)
        cfg, state = saved_config(ckpt), ckpt["domain_state"]
    cfg = with_domain_overrides(cfg, overrides)
    domain = build_domain(cfg["domain"])
    if state is None:
        domain.setup(domain.dataset("train"))
    else:
        domain.load_state_dict(state)
    return domain, cfg


def score_samples(domain: Domain, paths: Sequence[str | Path], reference: bool = True) -> dict[str, Any]:
    """``{"samples": [{"path", "n", "metrics"}, ...], "reference": metrics of as many real samples}``.

    The reference row scores as many held-out samples as the largest sample set (at most the
    split's size), so that count-dependent figures such as FID compare at equal counts.
    """
    rows = []
    for path in paths:
        batch = domain.read_samples(Path(path))
        rows.append({"path": str(path), "n": batch.num_samples, "metrics": domain.evaluate(batch)})
    record: dict[str, Any] = {"domain": domain.name, "samples": rows}
    if reference:
        try:
            record["reference"] = domain.reference_metrics(max(r["n"] for r in rows))
        except (FileNotFoundError, ValueError, OSError) as err:
            log.warning(
                "no real-data reference row: the training data could not be read (%s); point domain.root "
                "(or domain.path) at them, or pass --no-reference",
                err,
            )
            record["reference"] = None
    return record
