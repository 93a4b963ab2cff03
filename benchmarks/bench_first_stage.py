"""First stages side by side: each one's reconstruction row on the held-out clips, beside the real clips' row.

Every stage named (a fixed one, ``mel`` or ``mel128``, or the run folder of a trained autoencoder) encodes and decodes
the same ``--n`` held-out items of the audio domain, scored by the domain's metrics on both front ends (the log-mel
classifier and the raw-waveform one) with SI-SDR and the multi-resolution STFT distance
(:func:`polydiff.latent_outputs.first_stage_row`), and each row's figures are also given over the real clips'. The
target a first stage has to meet (issue "latent diffusion"): label accuracy >= 0.95 and IS >= 0.9x the real clips'
on both classifiers.

    python benchmarks/bench_first_stage.py --stages mel mel128 runs/audio_ae --n 100 --json result.json
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any, Optional

import torch

from benchmarks.bench_distill import write_result
from benchmarks.suite import environment
from polydiff.build import load_first_stage
from polydiff.latent import latent_domain

TARGET = {"label_acc": 0.95, "is": 0.9, "wave_label_acc": 0.95, "wave_is": 0.9}


def stage_row(spec: str, domain: dict[str, Any], n: int) -> dict[str, Any]:
    """The reconstruction row of the stage ``spec`` on ``n`` held-out items, with its encode-decode CPU seconds."""
    from domains.audio.domain import AudioDomain

    latent = latent_domain(AudioDomain(**domain), {"autoencoder": spec}, load_first_stage)
    start = time.process_time()
    row = latent.outputs.reconstruction_metrics(n)
    seconds = time.process_time() - start
    x = latent.inner.collate([latent.inner.dataset("test")[0]]).x  # [1, C, L]: one item
    return {**row, "cpu_s": seconds, "latent_values": latent.autoencoder.encode(x).numel(), "data_values": x.numel()}


def _value(text: str) -> Any:
    """A ``--set`` value: a number, boolean or list as JSON reads it, else the text."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def meets(row: dict[str, Any], real: dict[str, Any]) -> Optional[bool]:
    """Whether ``row`` meets :data:`TARGET` against ``real`` (``None`` where the metrics are not computed)."""
    if not all(k in row and k in real for k in TARGET):
        return None
    ok_acc = row["label_acc"] >= TARGET["label_acc"] and row["wave_label_acc"] >= TARGET["wave_label_acc"]
    ok_is = row["is"] >= TARGET["is"] * real["is"] and row["wave_is"] >= TARGET["wave_is"] * real["wave_is"]
    return bool(ok_acc and ok_is)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stages", nargs="+", default=["mel", "mel128"], help="fixed stage names or autoencoder runs")
    p.add_argument("--n", type=int, default=100, help="held-out items (the built-in set has 100 test clips)")
    p.add_argument("--set", nargs="*", default=[], help="audio domain settings, e.g. duration=0.3 limit=20")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    domain: dict[str, Any] = {"sample_rate": 16000, "duration": 1.0, "wave_metrics": True}
    for item in a.set:
        key, _, value = item.partition("=")
        domain[key] = _value(value)
    from domains.audio.domain import AudioDomain

    real = AudioDomain(**domain).reference_metrics(a.n)
    rows = {spec: stage_row(spec, domain, a.n) for spec in a.stages}
    for row in rows.values():
        row["vs_real"] = {k: row[k] / real[k] for k in real if k in row and isinstance(real[k], float) and real[k]}
        row["meets_target"] = meets(row, real)
    keys = ["label_acc", "is", "fid", "wave_label_acc", "wave_is", "wave_fid", "si_sdr", "mrstft"]
    print(f"{'stage':<24}" + "".join(f"{k:>15}" for k in keys) + f"{'latent values':>15}{'target':>8}")
    for name, row in [("real clips", real), *rows.items()]:
        cells = "".join(f"{row[k]:>15.4g}" if isinstance(row.get(k), float) else f"{'':>15}" for k in keys)
        print(f"{name[-24:]:<24}{cells}{row.get('latent_values', ''):>15}{str(row.get('meets_target', '')):>8}")
    result = {"benchmark": "first_stage", "domain": domain, "n": a.n, "real": real, "stages": rows, "target": TARGET}
    result["environment"] = environment(torch.device("cpu"))
    return write_result(a.json, result)


if __name__ == "__main__":
    main()
