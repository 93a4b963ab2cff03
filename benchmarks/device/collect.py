"""Gathers benchmarks/device/check.sh's results into at most 8 files in $OUT, and writes summary.md.

    python benchmarks/device/collect.py --facts FILE              # the machine's facts as JSON (set-up step)
    python benchmarks/device/collect.py --work WORK --out OUT --run RUN_DIR

Idempotent: check.sh calls it after every step, so a call cut short keeps what had run. Reads only
WORK (the steps' JSON parts and steps.tsv) and RUN_DIR (the audio run); writes only OUT.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Optional

CARRIED = [
    "hydra-core",
    "omegaconf",
    "antlr4-python3-runtime",
    "soundfile",
    "cffi",
    "pycparser",
    "diffusers",
    "denoising-diffusion-pytorch",
    "ema-pytorch",
    "pytorch-fid",
    "egnn-pytorch",
]
PRESENT = [
    "torch",
    "torchaudio",
    "torchvision",
    "numpy",
    "scipy",
    "scikit-learn",
    "torch-geometric",
    "huggingface-hub",
    "accelerate",
    "einops",
    "triton",
]
OUT_FILES = [
    "check.log",
    "summary.md",
    "env.json",
    "unet.json",
    "egnn.json",
    "audio_train_metrics.jsonl",
    "audio_sampling.json",
    "audio_sampling_bench.json",
]


def facts(path: Path) -> None:
    """Torch, CUDA and package facts of this machine (printed and written to ``path``)."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    info: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            {
                "device_name": torch.cuda.get_device_name(0),
                "capability": list(torch.cuda.get_device_capability(0)),
                "multiprocessors": props.multi_processor_count,
                "memory_gib": props.total_memory / 2**30,
                "bf16_supported": torch.cuda.is_bf16_supported(),
                "cudnn": torch.backends.cudnn.version(),
                "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
                "tf32_cudnn": torch.backends.cudnn.allow_tf32,
            }
        )
    else:
        info["device_name"] = "cpu"
    versions = {}
    for name in CARRIED + PRESENT:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    info["packages"] = versions
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        info["git_commit"] = commit.stdout.strip() if commit.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = None
    missing = [n for n in CARRIED if versions[n] is None]
    for line in json.dumps(info, indent=1).splitlines():
        print(f"[facts] {line}")
    if missing:
        print(f"[facts] MISSING packages (the steps that import them will fail): {missing}")
    path.write_text(json.dumps(info, indent=2))


def _load(path: Path) -> Optional[Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _steps(work: Path) -> list[dict[str, str]]:
    rows = []
    tsv = work / "parts" / "steps.tsv"
    if tsv.exists():
        for line in tsv.read_text().splitlines():
            cells = (line.split("\t") + [""] * 5)[:5]
            rows.append(dict(zip(("id", "name", "status", "exit", "seconds"), cells)))
    return rows


def _fmt(x: Any, nd: int = 2) -> str:
    if isinstance(x, bool) or x is None:
        return str(x)
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if x != x:
            return "nan"
        return f"{x:,.{nd}f}" if abs(x) < 1e5 else f"{x:.3g}"
    return str(x)


def _unet_lines(title: str, rep: Optional[dict]) -> list[str]:
    if not rep:
        return []
    lines = [
        f"### {title}",
        "",
        f"settings: {rep.get('settings')}",
        "",
        "| comparison | model | params | samples/s | step ms | warm-up s | peak MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for dim, peer in (("1d", "lucidrains"), ("2d", "diffusers")):
        row = rep.get("results", {}).get(dim)
        if not row:
            continue
        for label in ("ours", peer):
            if label not in row:
                lines.append(
                    f"| {dim} {row.get('config', {}).get('shape')} | {label} | not measured (stopped) | | | | |"
                )
                continue
            r = row[label]
            if "error" in r:
                lines.append(f"| {dim} {row.get('config', {}).get('shape')} | {label} | failed: {r['error']} | | | | |")
            else:
                lines.append(
                    f"| {dim} {row.get('config', {}).get('shape')} | {label} | {_fmt(r.get('params'))} | "
                    f"{_fmt(r.get('samples_per_s'))} | {_fmt(r.get('step_ms'), 1)} | {_fmt(r.get('warmup_s'), 1)} | "
                    f"{_fmt(r.get('peak_mem_mib'), 0)} |"
                )
        ratio = row.get("ratio_ours_over_theirs")
        if ratio:
            lines.append(
                f"| {dim} | ours/{peer} | {_fmt(ratio.get('params'))} | {_fmt(ratio.get('samples_per_s'))} | | | "
                f"{_fmt(ratio.get('peak_mem_mib'))} |"
            )
    return lines + [""]


def _egnn_lines(eager: Optional[dict], comp: Optional[dict]) -> list[str]:
    lines = []
    if eager:
        lines += ["### EGNN (bench_egnn.py)", ""]
        tr = eager.get("train")
        if tr:
            lines.append(
                f"* forward + backward, {tr['batch']} molecules ({tr['atoms']} atoms), width {tr['hidden']}, "
                f"{tr['layers']} layers: polydiff {_fmt(tr['polydiff_molecules_per_s'], 1)} molecules/s "
                f"({_fmt(tr['polydiff_params'])} params), egnn-pytorch {_fmt(tr['egnn_pytorch_molecules_per_s'], 1)} "
                f"({_fmt(tr['egnn_pytorch_params'])} params): ratio **{_fmt(tr['ratio_polydiff_over_egnn_pytorch'])}**"
            )
        lay = eager.get("layout")
        if lay:
            lines.append(
                f"* layout: edge list {_fmt(lay['edge_list_molecules_per_s'], 1)} vs dense "
                f"{_fmt(lay['dense_molecules_per_s'], 1)} molecules/s: "
                f"edge/dense **{_fmt(lay['ratio_edge_over_dense'])}**; "
                f"peak {_fmt(lay['edge_list_peak_mem_mib'], 1)} vs {_fmt(lay['dense_peak_mem_mib'], 1)} MiB; "
                "max |diff| "
                f"coords {lay['max_abs_diff_coords']:.1e}, features {lay['max_abs_diff_features']:.1e}, "
                f"grads {lay['max_rel_diff_grads']:.1e} relative"
            )
        smp = eager.get("sampling")
        if smp:
            lines.append(
                "* sampling molecules/s: "
                + ", ".join(
                    f"{k} {_fmt(v['molecules_per_s'])}"
                    + (
                        ""
                        if v.get("timed_steps") == int(k.split("-")[-1])
                        else f" (extrapolated from {v.get('timed_steps')} steps)"
                    )
                    for k, v in smp.items()
                )
            )
    if comp and comp.get("compile"):
        c = comp["compile"]
        lines.append(
            f"* torch.compile: {c['unique_graphs']} graphs, {c['graph_breaks']} breaks, settles after "
            f"{_fmt(c['settle_s'], 1)} s; compiled {_fmt(c['step_s_compiled'] * 1e3, 1)} ms vs eager "
            f"{_fmt(c['step_s_eager'] * 1e3, 1)} ms a step: eager/compiled **{_fmt(c['eager_over_compiled'])}**"
        )
    return lines + ([""] if lines else [])


def _audio_lines(run: Path, sampling: Optional[dict], bench: Optional[dict], tiny: bool) -> list[str]:
    lines: list[str] = []
    metrics = run / "metrics.jsonl"
    if metrics.exists():
        recs = []
        for line in metrics.read_text().splitlines():
            try:
                recs.append(json.loads(line))
            except ValueError:
                pass
        train = [r for r in recs if r.get("kind") == "train"]
        lines += [
            f"### Audio, recipes/audio_unet.yaml {'profile=cpu (TINY)' if tiny else 'GPU defaults (16 kHz, bf16)'}",
            "",
        ]
        if train:
            sps = [r["samples_per_s"] for r in train[1:]] or [train[0]["samples_per_s"]]
            head = ", ".join(f"{r['step']}: {r['loss']:.4f}" for r in train[:3])
            tail = ", ".join(f"{r['step']}: {r['loss']:.4f}" for r in train[-3:])
            lines.append(
                f"* trained to step {train[-1]['step']}; {_fmt(sum(sps) / len(sps), 1)} clips/s (mean of "
                f"{len(sps)} log intervals after the first; min {_fmt(min(sps), 1)}, max {_fmt(max(sps), 1)})"
            )
            lines.append(f"* loss head {head}; tail {tail}")
    if sampling:
        s = sampling
        lines.append(
            f"* {s['sampler']['name']}-{s['sampler']['steps']}, guidance {s['guidance']['scale']}, {s['n']} clips "
            f"from step {s['step']} in {_fmt(s['seconds'], 1)} s on {s['device']}"
        )
        m, ref = s.get("metrics") or {}, s.get("reference") or {}
        keys = [k for k in m if isinstance(m[k], (int, float))]
        if keys:
            lines += [
                "",
                "| | " + " | ".join(keys) + " |",
                "|---|" + "---|" * len(keys),
                "| samples | " + " | ".join(_fmt(m[k]) for k in keys) + " |",
            ]
            if ref:
                lines.append(
                    f"| real held-out ({ref.get('num_samples')}) | " + " | ".join(_fmt(ref.get(k)) for k in keys) + " |"
                )
    if bench:
        lines.append("")
        lines.append(
            f"* bench_audio_sampling ({bench.get('device_name')}, {bench.get('sample_rate')} Hz, "
            f"{_fmt(bench.get('parameters'))} params, guidance {bench.get('guidance')}): "
            + ", ".join(
                f"{r['sampler']}-{r['steps']} {_fmt(r['audio_seconds_per_second'])} s of audio/s "
                f"({r['clips']} clips in {_fmt(r['seconds'])} s)"
                for r in bench.get("rows", [])
            )
        )
        calls = bench.get("guidance_calls")
        if calls:
            lines.append(
                f"* guidance, {calls['sampler']}-{calls['steps']}: one stacked network call per step "
                f"{_fmt(calls['stacked_seconds'])} s, two calls {_fmt(calls['two_call_seconds'])} s "
                f"(x{_fmt(calls['ratio_two_calls_over_stacked'])})"
            )
    return lines + ([""] if lines else [])


def collect(work: Path, out: Path, run: Path) -> None:
    parts = work / "parts"
    out.mkdir(parents=True, exist_ok=True)
    facts_ = _load(parts / "env_facts.json") or {}
    steps = _steps(work)
    settings = {k[len("DEVCHECK_") :].lower(): v for k, v in os.environ.items() if k.startswith("DEVCHECK_")}
    smi = (parts / "nvidia_smi.csv").read_text() if (parts / "nvidia_smi.csv").exists() else None
    env = {**facts_, "nvidia_smi": smi, "settings": settings, "steps": steps}
    (out / "env.json").write_text(json.dumps(env, indent=2))

    unet = {
        k: v
        for k, v in (
            ("bf16", _load(parts / "unet_bf16.json")),
            ("compile_1d", _load(parts / "unet_compile_1d.json")),
            ("compile_2d", _load(parts / "unet_compile_2d.json")),
        )
        if v is not None
    }
    if unet:
        (out / "unet.json").write_text(json.dumps(unet, indent=2))
    egnn = {
        k: v
        for k, v in (("eager", _load(parts / "egnn.json")), ("compile", _load(parts / "egnn_compile.json")))
        if v is not None
    }
    if egnn:
        (out / "egnn.json").write_text(json.dumps(egnn, indent=2))
    if (run / "metrics.jsonl").exists():
        shutil.copyfile(run / "metrics.jsonl", out / "audio_train_metrics.jsonl")
    sampling = _load(run / "eval" / "sampling.json")
    if sampling is not None:
        shutil.copyfile(run / "eval" / "sampling.json", out / "audio_sampling.json")
    bench = _load(parts / "audio_sampling_bench.json")
    if bench is not None:
        shutil.copyfile(parts / "audio_sampling_bench.json", out / "audio_sampling_bench.json")

    device = facts_.get("device_name", "unknown")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    tiny = settings.get("tiny") == "1"
    lines = [
        f"# polydiff device check: {device}{' (TINY dry run: sizes are not figures)' if tiny else ''}",
        "",
        f"torch {facts_.get('torch')} (CUDA {facts_.get('torch_cuda')}, cuDNN {facts_.get('cudnn')}), Python "
        f"{facts_.get('python')}, {facts_.get('date')}; commit {facts_.get('git_commit')}; settings {settings}",
        "",
        f"Keep: copy these files to benchmarks/results/{stamp}_devcheck_{device.replace(' ', '-').replace('/', '-')}/",
        "",
        "| step | what | status | exit | seconds |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {s['id']} | {s['name']} | {s['status']} | {s['exit']} | {s['seconds']} |" for s in steps]
    lines.append("")
    lines += _unet_lines("U-Nets, bf16 autocast, eager (bench_unet.py)", unet.get("bf16"))
    lines += _egnn_lines(egnn.get("eager"), egnn.get("compile"))
    lines += _audio_lines(run, sampling, bench, tiny)
    lines += _unet_lines("U-Nets, bf16, torch.compile, 1-D (warm-up s includes compiling)", unet.get("compile_1d"))
    lines += _unet_lines("U-Nets, bf16, torch.compile, 2-D (warm-up s includes compiling)", unet.get("compile_2d"))
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    extra = sorted(p.name for p in out.iterdir() if p.name not in OUT_FILES)
    if extra:
        print(f"collect: other files in {out} (only 8 come back from the GPU machine): {extra}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--facts", type=Path, default=None, help="write this machine's facts as JSON here, then stop")
    p.add_argument("--work", type=Path)
    p.add_argument("--out", type=Path)
    p.add_argument("--run", type=Path)
    a = p.parse_args()
    if a.facts is not None:
        facts(a.facts)
        return
    if a.work is None or a.out is None or a.run is None:
        p.error("--work, --out and --run are needed")
    collect(a.work, a.out, a.run)


if __name__ == "__main__":
    main()
