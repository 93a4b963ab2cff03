"""Markdown tables and PNG plots from a ``polydiff bench`` result."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _metric_keys(rows: list[dict[str, Any]]) -> list[str]:
    keys: list[str] = []
    for r in rows:
        for k in r.get("metrics", {}):
            if k not in keys:
                keys.append(k)
    return keys


def write_markdown(result: dict[str, Any], path: Path) -> str:
    env = result["environment"]
    lines = [f"# polydiff bench ({result['suite']}) on {env['device_name']}",
             "", f"commit `{env['git_commit'][:12]}`{' with uncommitted changes' if env.get('git_dirty') else ''}, "
                 f"torch {env['torch']}, {env['date']}", ""]
    for name, d in result["domains"].items():
        lines.append(f"## {name}")
        if "error" in d or "skipped" in d:
            lines += ["", f"failed: {d['error']}" if "error" in d else f"skipped: {d['skipped']}", ""]
            continue
        t = d["train"]
        if "environment" in d:  # a merged report: where this domain ran
            e = d["environment"]
            lines += ["", f"measured on {e['device_name']} ({e['device']}), commit `{e['git_commit'][:12]}`, {e['date']}"]
        lines += ["", f"training: {t['steps']} steps in {t['wall_s']:.0f} s, {t['samples_per_s']:.1f} samples/s, "
                      f"peak memory {t['peak_mem_mb']:.0f} MiB, final loss {t['final_loss']:.4f}", ""]
        keys = _metric_keys(d["sampling"])
        lines.append(_row(["sampler", "steps", "guidance", "samples/s", "wall s", "peak MiB", *keys]))
        lines.append(_row(["---"] * (6 + len(keys))))
        if d.get("reference"):
            ref = d["reference"]
            label = f"real data ({ref['num_samples']} held-out)" if "num_samples" in ref else "real data (reference)"
            lines.append(_row([label, "", "", "", "", "", *(_fmt(ref.get(k, "")) for k in keys)]))
        for r in d["sampling"]:
            speed = f"{r['samples_per_s']:.2f}" + (f" ({r['audio_seconds_per_s']:.1f} s audio/s)" if "audio_seconds_per_s" in r else "")
            lines.append(_row([r["sampler"], r["steps"], r["guidance"], speed, f"{r['wall_s']:.2f}",
                               f"{r['peak_mem_mb']:.0f}", *(_fmt(r["metrics"].get(k, "")) for k in keys)]))
        for r in d.get("sampling_errors", []):
            lines.append(f"| {r['sampler']} | {r['steps']} | {r['guidance']} | failed: {r['error']} |")
        lines += ["", "training throughput against batch size: "
                  + ", ".join(f"{x['batch_size']}: {x['samples_per_s']:.1f}/s ({x['peak_mem_mb']:.0f} MiB)" for x in d["throughput_vs_batch"]), ""]
        if d.get("throughput_vs_size"):
            lines += [f"training throughput against {d['throughput_vs_size'][0]['axis']} (batch {d['throughput_vs_size'][0]['batch_size']}): "
                      + ", ".join(f"{x['size']}: {x['samples_per_s']:.1f}/s ({x['peak_mem_mb']:.0f} MiB)" for x in d["throughput_vs_size"]), ""]
        if d.get("compile"):
            c = d["compile"]
            if "error" in c:
                lines += [f"torch.compile check failed: {c['error']}", ""]
            else:
                lines += [f"torch.compile, training at batch {c['batch_size']}: eager {c['eager_samples_per_s']:.1f}/s, compiled "
                          f"{c['compiled_samples_per_s']:.1f}/s (x{c['ratio_compiled_over_eager']:.2f}), compiled in {c['compile_s']:.0f} s",
                          ""]
        for peer, p in d.get("peers", {}).items():
            if peer == "diffusers" and "samplers" in p:
                lines += _diffusers_table(p, keys)
            else:
                lines.append(f"peer `{peer}`: " + _peer_line(p))
        lines.append("")
    text = "\n".join(lines)
    path.write_text(text)
    return text


def _diffusers_table(p: dict[str, Any], keys: list[str]) -> list[str]:
    """diffusers' schedulers on the trained network: time, agreement and metrics beside polydiff's."""
    metric = [f"{keys[0]} polydiff", f"{keys[0]} diffusers"] if keys else []  # a domain without metrics: none
    lines = ["", f"peer `diffusers` (its schedulers driving the trained network, {p['num_samples']} samples, same noise):", "",
             _row(["sampler", "steps", "polydiff s", "diffusers s", "ratio", "max rel. diff", *metric]),
             _row(["---"] * (6 + len(metric)))]
    for r in p["samplers"].values():
        values = [_fmt(r["metrics_polydiff"].get(keys[0], "")), _fmt(r["metrics_diffusers"].get(keys[0], ""))] if keys else []
        lines.append(_row([r["sampler"], r["steps"], f"{r['polydiff_s']:.2f}", f"{r['diffusers_s']:.2f}",
                           f"{r['ratio_polydiff_over_diffusers']:.2f}", f"{r['max_rel_diff']:.1e}", *values]))
    return lines + [""]


def _row(cells: list[Any]) -> str:
    """One Markdown table row."""
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _peer_line(p: dict[str, Any]) -> str:
    if "error" in p:
        return f"not run ({p['error']})"
    if "skipped" in p:
        return f"skipped ({p['skipped']})"
    parts, failed = [], []

    def walk(prefix: str, obj: Any) -> None:
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        elif prefix.rpartition(".")[2] == "error":  # one model of the comparison failed (e.g. out of memory)
            failed.append(f"{prefix.rpartition('.')[0]} failed ({obj})")
        elif "ratio" in prefix and isinstance(obj, (int, float)):
            parts.append(f"{prefix} = {obj:.2f}")

    walk("", p)
    return "; ".join(parts + failed) or "no ratios reported"


def write_plots(result: dict[str, Any], folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    domains = {k: v for k, v in result["domains"].items() if "error" not in v and "skipped" not in v}
    if not domains:
        return written
    # Quality against the number of steps, per domain and sampler (first metric of the domain).
    fig, axes = plt.subplots(1, len(domains), figsize=(4.5 * len(domains), 3.6), squeeze=False)
    for ax, (name, d) in zip(axes[0], domains.items()):
        keys = _metric_keys(d["sampling"])
        if not keys:
            ax.set_title(f"{name}: no metrics")
            continue
        key = keys[0]
        for sampler in sorted({r["sampler"] for r in d["sampling"]}):
            for g in sorted({r["guidance"] for r in d["sampling"]}):
                rows = sorted((r for r in d["sampling"] if r["sampler"] == sampler and r["guidance"] == g), key=lambda r: r["steps"])
                if rows:
                    ax.plot([r["steps"] for r in rows], [r["metrics"].get(key, float("nan")) for r in rows], "o-",
                            label=f"{sampler}" + (f" w={g}" if g != 1.0 else ""))
        if key in d.get("reference", {}):
            ax.axhline(d["reference"][key], color="k", ls="--", lw=1, label="real data")
        ax.set_xscale("log")
        ax.set_xlabel("sampler steps")
        ax.set_ylabel(key)
        ax.set_title(name)
        ax.legend(fontsize=7)
    written.append(_save(fig, folder / "quality_vs_steps.png"))
    # Loss curves.
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for name, d in domains.items():
        c = d["train"]["loss_curve"]
        ax.plot([p["step"] for p in c], [p["loss"] for p in c], label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.legend()
    written.append(_save(fig, folder / "loss_curves.png"))
    # Throughput against batch size; sampling time against steps.
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(15, 3.6))
    for name, d in domains.items():
        tb = d["throughput_vs_batch"]
        a1.plot([x["batch_size"] for x in tb], [x["samples_per_s"] for x in tb], "o-", label=name)
        rows = sorted((r for r in d["sampling"] if r["guidance"] == 1.0), key=lambda r: r["steps"])
        a2.plot([r["steps"] for r in rows], [r["wall_s"] / r["num_samples"] for r in rows], "o", label=name)
        ts = d.get("throughput_vs_size") or []
        if ts:
            a3.plot([x["size"] for x in ts], [x["samples_per_s"] for x in ts], "o-", label=f"{name} ({ts[0]['axis']})")
    a1.set_xscale("log")
    a1.set_yscale("log")
    a1.set_xlabel("batch size")
    a1.set_ylabel("training samples/s")
    a1.legend()
    a2.set_xscale("log")
    a2.set_yscale("log")
    a2.set_xlabel("sampler steps")
    a2.set_ylabel("seconds per sample")
    a2.legend()
    a3.set_xscale("log")
    a3.set_yscale("log")
    a3.set_xlabel("sample size (seconds of audio, atoms)")
    a3.set_ylabel("training samples/s")
    if a3.lines:
        a3.legend()
    else:
        a3.text(0.5, 0.5, "no domain measured a size sweep", ha="center", va="center", transform=a3.transAxes)
    written.append(_save(fig, folder / "scaling.png"))
    return written


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
