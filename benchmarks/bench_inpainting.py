"""Audio inpainting quality: held-out clips with a stretch silenced, filled by a trained model.

Takes ``--per-label`` held-out clips of every digit from a run's data, silences
``[--start, --end)`` seconds, fills that stretch by imputation (``polydiff.samplers.Known``,
as ``polydiff sample --known`` does) without a label and with the clip's own label, and scores
every version with the domain's metrics (the SC09 classifier: label accuracy, FID, IS):

    python benchmarks/bench_inpainting.py RUN_DIR --start 0.15 --end 0.45 --per-label 3
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from polydiff.build import load_run, resolve_device
from polydiff.domain import Batch
from polydiff.generate import generate
from polydiff.samplers import Known
from polydiff.space import DenseSpace


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path)
    p.add_argument("--start", type=float, default=0.15, help="seconds: the silenced stretch starts here")
    p.add_argument("--end", type=float, default=0.45, help="seconds: and ends here")
    p.add_argument("--per-label", type=int, default=3, help="held-out clips of each label")
    p.add_argument("--sampler", default="dpmpp_2m")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    a = p.parse_args(argv)
    device = resolve_device(a.device, "--device")
    parts, ckpt = load_run(a.run_dir, device=device)
    domain = parts.domain
    clips = domain.dataset(domain.reference_split)  # waves [N, C, L], labels [N]
    pick = torch.cat([(clips.labels == k).nonzero().flatten()[: a.per_label] for k in range(len(domain.label_names))])
    waves, labels = clips.waves[pick], clips.labels[pick]  # [n, C, L], [n]
    lo, hi = round(a.start * domain.sample_rate), round(a.end * domain.sample_rate)
    mask = torch.ones(1, *waves.shape[1:], dtype=torch.bool)  # [1, C, L]: kept
    mask[..., lo:hi] = False
    rows = {"originals": waves, "with the gap": waves * mask}
    for name, cond_labels in (("filled without a label", None), ("filled with the label", labels)):
        g = torch.Generator(device=device).manual_seed(a.seed)
        batch = generate(
            domain,
            parts.net,
            parts.schedule,
            parts.objective,
            len(waves),
            {"name": a.sampler, "steps": a.steps},
            {"scale": 1.0},
            labels=cond_labels,
            device=device,
            generator=g,
            known=Known(waves.to(device), mask.to(device)),
        )
        rows[name] = batch.x.cpu()
    print(
        f"{len(waves)} held-out clips, {a.start:g}-{a.end:g} s filled by {a.sampler}-{a.steps} "
        f"(checkpoint step {ckpt['step']}):"
    )
    result = {}
    for name, x in rows.items():
        metrics = domain.evaluate(Batch(x, DenseSpace(tuple(x.shape)), {"label": labels}))
        result[name] = metrics
        print(f"  {name:24s} label acc. {metrics['label_acc']:.2f}  FID {metrics['fid']:7.1f}  IS {metrics['is']:.2f}")
    return result


if __name__ == "__main__":
    main()
