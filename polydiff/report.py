"""``polydiff report``: one offline HTML page of a run or of a ``polydiff sample`` folder.

A run's page holds its recipe, loss and metric curves, the metric table beside the real-data reference row, every
sample of the newest scored step (grouped by label, real data beside them) and a few of each earlier step. Training
writes it at each scored step (:func:`report_step`, with TensorBoard media where installed), ``polydiff sample``
into its output folder. What a domain shows of its samples is its outputs' hook
:meth:`polydiff.outputs.Outputs.report_items`; the page's HTML is :mod:`polydiff.report_html`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import re
import time
import weakref
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from .domain import Domain
from .report_html import data_uri, esc, fmt, items_html, page_html, table_html
from .report_items import ReportItem, figure_png, new_figure
from .state import Batch

__all__ = ["write_report", "report_step", "report_after_sampling", "samples_html", "draws", "main"]

log = logging.getLogger("polydiff")

MAX_LATEST = 128  # samples shown of the newest draw: every one of the usual draws, yet a page that still loads
MAX_EARLIER = 6  # samples shown of each earlier scored step
MAX_STEPS = 8  # earlier scored steps shown, spread evenly over the run
MAX_MEDIA = 16  # report items sent to TensorBoard at each scored step
REAL_PER_LABEL, REAL_COUNT = 3, 32  # real samples shown: a few of each label, or this many without labels
REAL_SCAN = 512  # real samples looked at to find each label's (a collated batch of them must fit in memory)
_PREFIX = re.compile(r"^(step_\d+|samples)(?=[._]|$)")  # the prefixes the trainer and polydiff sample give save_samples
_REAL: dict[int, tuple[list[ReportItem], str]] = {}  # by id(domain), dropped with the domain: drawn once per run


def draws(folder: Path) -> dict[str, list[Path]]:
    """The files (and folders, such as molecules' XYZ) of each draw in ``folder``, by their save_samples prefix."""
    found: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        match = _PREFIX.match(path.name)
        if match:
            found.setdefault(match.group(1), []).append(path)
    return found


def _records(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's records; a torn last line (a kill mid-write) is skipped."""
    path = run_dir / "metrics.jsonl"
    records = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def _config(folder: Path, checkpoint: Optional[Path]) -> Optional[dict[str, Any]]:
    """The recipe a run was trained with: Hydra's record of it, else the checkpoint's copy."""
    hydra = folder / ".hydra" / "config.yaml"
    if hydra.is_file():
        from omegaconf import OmegaConf

        return OmegaConf.to_container(OmegaConf.load(hydra), resolve=False)
    if checkpoint is not None and checkpoint.is_file():
        from .checkpoint import load_checkpoint

        return dict(load_checkpoint(checkpoint, mmap=True)["config"])
    return None


def _flat(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(value, Mapping) and value:
        return [pair for k, v in value.items() for pair in _flat(v, f"{prefix}.{k}" if prefix else str(k))]
    return [(prefix, json.dumps(value) if isinstance(value, (list, tuple, Mapping)) else value)]


def _recipe_html(cfg: Optional[Mapping[str, Any]]) -> str:
    if not cfg:
        return '<p class="note">no recipe recorded (no .hydra/config.yaml and no checkpoint yet)</p>'
    tables = [
        f"<div><h3>{esc(k)}</h3>"
        + (
            table_html(["key", "value"], _flat(v), cls="settings")
            if isinstance(v, Mapping)
            else f"<p>{esc(fmt(v))}</p>"
        )
        + "</div>"
        for k, v in cfg.items()
        if k != "hydra"
    ]
    return f'<div class="recipe">{"".join(tables)}</div>'


def _numbers(record: Mapping[str, Any], skip: Sequence[str] = ("step", "num_samples", "world_size")) -> list[str]:
    return [k for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in skip]


def _curves_html(records: Sequence[Mapping[str, Any]]) -> str:
    """Training curves (loss, learning rate, gradient norm) and each metric against the step, real data dashed."""
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    reference = next((r for r in reversed(records) if r.get("kind") == "reference"), {})
    panels = [(k, train, "train") for k in ("loss", "lr", "grad_norm") if any(k in r for r in train)]
    keys = [k for r in evals for k in _numbers(r)]
    panels += [(k, evals, "eval") for k in dict.fromkeys(keys)]
    if not panels:
        return '<p class="note">no training records yet (metrics.jsonl)</p>'
    cols = min(4, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = new_figure(3.4 * cols, 2.6 * nrows, cols, nrows)
    for ax, (key, rows, kind) in zip(axes.flat, panels):
        points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        ax.plot([p[0] for p in points], [p[1] for p in points], "o-" if kind == "eval" else "-", ms=3, lw=1.2)
        if kind == "eval" and isinstance(reference.get(key), (int, float)):
            ax.axhline(reference[key], color="k", ls="--", lw=1, label="real data")
            ax.legend(fontsize=7)
        if key == "loss" and points and min(p[1] for p in points) > 0:
            ax.set_yscale("log")
        ax.set_title(key if kind == "train" else f"{key} (samples)", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_axis_off()
    # Fixed margins: tight_layout measures every tick label, the slowest part of a report at each scored step.
    fig.subplots_adjust(
        left=0.22 / cols,
        right=1 - 0.03 / cols,
        bottom=0.45 / (2.6 * nrows),
        top=1 - 0.35 / (2.6 * nrows),
        wspace=0.45,
        hspace=0.6,
    )
    return f'<img class="plot" alt="training and metric curves" src="{data_uri("image/png", figure_png(fig))}">'


def _metrics_html(rows: Sequence[tuple[str, Mapping[str, Any]]], reference: Optional[Mapping[str, Any]]) -> str:
    """The metric table: one row per scored draw, and the real-data reference row under them."""
    keys = list(dict.fromkeys(k for _, r in rows for k in _numbers(r)))
    if reference:
        keys += [k for k in _numbers(reference) if k not in keys]
    if not keys:
        return '<p class="note">no metrics logged (trainer.eval=false, or a domain without metrics)</p>'
    body = [[name, *(r.get(k) for k in keys)] for name, r in rows]
    if reference:
        n = reference.get("num_samples")
        body.append([f"real data{f' ({n} held-out)' if n else ''}", *(reference.get(k) for k in keys)])
    return table_html(["samples", *keys], body, real_rows=[len(body) - 1] if reference else [])


def _real_items(domain: Domain) -> tuple[list[ReportItem], str]:
    """A few real samples of each label (the held-out split where there is one) as report items, or a note why there
    are none."""
    if id(domain) in _REAL:
        return _REAL[id(domain)]
    items, note = [], ""
    for split in ("test", "val", "train"):
        try:
            data = domain.dataset(split)
            if len(data) == 0:
                continue
            # A spread of the split (the first items may all share a label), then a few of each label among them.
            spread = np.unique(np.linspace(0, len(data) - 1, min(REAL_SCAN, len(data))).round().astype(int))
            labels = domain.collate([data[int(i)] for i in spread]).cond.get("label")
            if labels is not None and labels.dim() == 1 and len(labels) == len(spread):
                picks = [
                    int(spread[j])
                    for y in labels.unique().tolist()
                    for j in (labels == y).nonzero().flatten()[:REAL_PER_LABEL].tolist()
                ]
            else:
                picks = spread[np.linspace(0, len(spread) - 1, min(REAL_COUNT, len(spread))).round().astype(int)]
            batch = domain.collate([data[int(i)] for i in sorted(set(int(i) for i in picks))])
            items = [
                dataclasses.replace(it, real=True, title=f"{it.title} ({split} split)")
                for it in domain.outputs.report_items(batch)
            ]
            break
        except Exception as err:  # noqa: BLE001 -- real data are shown where they can be read; the page says why not
            note = f"real data not shown: the {split} split could not be read ({type(err).__name__}: {err})"
    try:  # kept while the domain lives (a trainer's, at every scored step); a domain without weak references: not kept
        weakref.finalize(domain, _REAL.pop, id(domain), None)
        _REAL[id(domain)] = (items, "" if items else note)
    except TypeError:
        pass
    return items, "" if items else note


def samples_html(domain: Optional[Domain], samples: Batch | Sequence[Path], limit: int, real: bool = True) -> str:
    """Samples (a batch, or one draw's files) as the domain's report items grouped by label, with a few real ones of
    each label beside them where ``real``."""
    if domain is None:
        return ""
    items = domain.outputs.report_items(samples if isinstance(samples, Batch) else list(samples), limit=limit)
    if not items:
        names = "these samples" if isinstance(samples, Batch) else ", ".join(f.name for f in samples[:3])
        return f'<p class="note">the domain\'s report_items shows nothing of {esc(names)}</p>'
    reals, note = _real_items(domain) if real else ([], "")
    return (f'<p class="note">{esc(note)}</p>' if note else "") + items_html(items, reals)


def _load_domain(checkpoint: Optional[Path], overrides: Sequence[str]) -> tuple[Optional[Domain], str]:
    """The run's domain from its checkpoint (its data state; no training data needed), or a note why there is none."""
    if checkpoint is None or not checkpoint.is_file():
        return None, f"no samples shown: no checkpoint at {checkpoint} to rebuild the run's domain from"
    from .scoring import load_domain

    try:
        return load_domain(checkpoint, overrides)[0], ""
    except (KeyError, ImportError, ValueError, FileNotFoundError) as err:  # the page still shows the figures
        return None, f"no samples shown: the run's domain could not be rebuilt from {checkpoint} ({err})"


def _run_sections(run: Path, domain: Optional[Domain], cfg: Any) -> list[tuple[str, str, str]]:
    records = _records(run)
    evals = [r for r in records if r.get("kind") == "eval"]
    reference = next((r for r in reversed(records) if r.get("kind") == "reference"), None)
    steps = sorted(
        ((int(k.split("_")[1]), v) for k, v in draws(run / "samples").items() if k.startswith("step_")),
        key=lambda kv: kv[0],
    )
    sections = [
        ("metrics", "Metrics", _metrics_html([(f"step {r['step']}", r) for r in evals], reference)),
        ("curves", "Curves", _curves_html(records)),
    ]
    if steps:
        sections.append(
            ("samples", f"Samples at step {steps[-1][0]}", samples_html(domain, steps[-1][1], MAX_LATEST, real=True))
        )
    earlier = steps[:-1]
    if earlier:
        picks = sorted(set(np.linspace(0, len(earlier) - 1, min(MAX_STEPS, len(earlier))).round().astype(int)))
        body = "".join(
            f"<h3>step {earlier[i][0]}</h3>" + samples_html(domain, earlier[i][1], MAX_EARLIER, real=False)
            for i in reversed(picks)
        )
        sections.append(("progress", "Earlier steps", body))
    others = sorted(p.parent for p in (run / "samples").glob("*/sampling.json"))
    if others:
        links = "".join(
            f'<li><a href="{esc(p.relative_to(run).as_posix())}/report.html">{esc(p.name)}</a></li>' for p in others
        )
        sections.append(("draws", "Draws of polydiff sample", f"<ul>{links}</ul>"))
    return [*sections, ("recipe", "Recipe", _recipe_html(cfg))]


def _sampling_sections(folder: Path, domain: Optional[Domain], cfg: Any) -> list[tuple[str, str, str]]:
    record = json.loads((folder / "sampling.json").read_text())
    settings = [
        (k, json.dumps(v) if isinstance(v, (dict, list)) else v)
        for k, v in record.items()
        if k not in ("metrics", "metrics_range", "reference", "runs")
    ]
    rows = [("samples", record["metrics"])] if record.get("metrics") else []
    sections = [
        ("metrics", "Metrics", _metrics_html(rows, record.get("reference"))),
        ("sampling", "Sampling", table_html(["setting", "value"], settings, cls="settings")),
    ]
    seeds = sorted(p for p in folder.glob("seed-*") if p.is_dir())
    for where in [folder, *seeds]:
        for name, files in draws(where).items():
            heading = f"Samples ({where.name})" if where != folder else "Samples"
            sections.append((f"samples-{where.name}-{name}", heading, samples_html(domain, files, MAX_LATEST)))
    return [*sections, ("recipe", "Recipe", _recipe_html(cfg))]


def write_report(
    folder: Path | str,
    domain: Optional[Domain] = None,
    cfg: Optional[Mapping[str, Any]] = None,
    overrides: Sequence[str] = (),
) -> Path:
    """Write ``folder/report.html`` for a run folder or a ``polydiff sample`` output folder; returns its path.

    ``domain`` (else rebuilt from the checkpoint, with ``domain.KEY=V`` ``overrides``) reads and shows the samples;
    ``cfg`` is the recipe (else ``.hydra/config.yaml`` or the checkpoint's).
    """
    folder = Path(folder)
    sampled = (folder / "sampling.json").is_file()
    if not sampled and not any((folder / p).exists() for p in ("metrics.jsonl", "checkpoints", "samples")):
        raise FileNotFoundError(
            f"{folder} is neither a run folder (metrics.jsonl, checkpoints/, samples/) nor a "
            "folder written by polydiff sample (sampling.json): give one of those"
        )
    checkpoint = folder / "checkpoints" / "last.pt"
    if sampled:
        checkpoint = Path(json.loads((folder / "sampling.json").read_text()).get("checkpoint", ""))
        if not checkpoint.is_file():  # a path relative to where polydiff sample ran: try RUN/samples/FOLDER's run
            checkpoint = folder.resolve().parent.parent / "checkpoints" / "last.pt"
    note = ""
    if domain is None:
        domain, note = _load_domain(checkpoint, overrides)
    cfg = cfg if cfg is not None else _config(folder, checkpoint)
    sections = (_sampling_sections if sampled else _run_sections)(folder, domain, cfg)
    kind = "samples" if sampled else "run"
    subtitle = (
        f"{kind} {esc(folder.resolve())} · domain {esc(getattr(domain, 'name', '?'))} · written "
        f"{time.strftime('%Y-%m-%d %H:%M:%S')}" + (f'<p class="note">{esc(note)}</p>' if note else "")
    )
    path = folder / "report.html"
    tmp = path.with_suffix(".html.tmp")  # a page open in a browser never sees half a file
    tmp.write_text(page_html(f"polydiff {kind}: {folder.resolve().name}", subtitle, sections), encoding="utf-8")
    tmp.replace(path)
    return path


def report_step(
    run_dir: Path,
    domain: Domain,
    batch: Batch,
    step: int,
    metrics_log: Any = None,
    cfg: Optional[Mapping[str, Any]] = None,
) -> Optional[Path]:
    """At a scored step: the draw's media to TensorBoard (where installed) and ``run_dir/report.html``. A failure
    warns and returns ``None``: a page that cannot be drawn must never stop training."""
    try:
        if metrics_log is not None and getattr(metrics_log, "tb", None) is not None:
            metrics_log.media(step, domain.outputs.report_items(batch, limit=MAX_MEDIA))
        return write_report(run_dir, domain, cfg)
    except Exception as err:  # noqa: BLE001 -- see the docstring
        log.warning(
            "step %d: the report could not be written (%s: %s); training goes on. Write it later with "
            "polydiff report %s",
            step,
            type(err).__name__,
            err,
            run_dir,
        )
        return None


def report_after_sampling(out: Path, domain: Domain) -> Optional[Path]:
    """``out/report.html`` for ``polydiff sample``'s folder; a failure warns (the samples are written already)."""
    try:
        return write_report(out, domain)
    except Exception as err:  # noqa: BLE001 -- the samples are safe; only their page is missing
        log.warning(
            "the report could not be written (%s: %s); try again with polydiff report %s", type(err).__name__, err, out
        )
        return None


def main(argv: Sequence[str]) -> Path:
    """``polydiff report FOLDER [domain.KEY=V]``: write FOLDER/report.html and print its path."""
    p = argparse.ArgumentParser(
        prog="polydiff report",
        description="Write an offline HTML page of a run or of a "
        "polydiff sample folder: recipe, curves, metrics beside real data, every sample.",
    )
    p.add_argument("folder", type=Path, help="a run folder, or a folder written by polydiff sample")
    p.add_argument("overrides", nargs="*", help="domain.KEY=V, e.g. domain.root=DIR where the real data now lie")
    a = p.parse_args(list(argv))
    bad = [o for o in a.overrides if not o.lstrip("+").startswith("domain.") or "=" not in o]
    if bad:
        raise ValueError(f"polydiff report takes domain.KEY=V settings only, not {bad}")
    path = write_report(a.folder, overrides=a.overrides)
    print(f"wrote {path}")
    return path
