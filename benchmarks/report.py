"""Markdown tables, PNG plots and an offline HTML page (tables, plots, a few samples per domain) from a
``polydiff bench`` result."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional


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


def write_markdown(result: dict[str, Any], path: Optional[Path]) -> str:
    env = result["environment"]
    lines = [
        f"# polydiff bench ({result['suite']}) on {env['device_name']}",
        "",
        f"commit `{env['git_commit'][:12]}`{' with uncommitted changes' if env.get('git_dirty') else ''}, "
        f"torch {env['torch']}, {env['date']}",
        "",
    ]
    for name, d in result["domains"].items():
        lines.append(f"## {name}")
        if "error" in d or "skipped" in d:
            lines += ["", f"failed: {d['error']}" if "error" in d else f"skipped: {d['skipped']}", ""]
            continue
        t = d["train"]
        if "environment" in d:  # a merged report: where this domain ran
            e = d["environment"]
            lines += [
                "",
                f"measured on {e['device_name']} ({e['device']}), commit `{e['git_commit'][:12]}`, {e['date']}",
            ]
        lines += [
            "",
            f"training: {t['steps']} steps in {t['wall_s']:.0f} s, {t['samples_per_s']:.1f} samples/s, "
            f"peak memory {t['peak_mem_mb']:.0f} MiB, final loss {t['final_loss']:.4f}",
            "",
        ]
        if t.get("nll"):
            lines += [_nll_line(t["nll"]), ""]
        if d.get("first_stage"):
            lines += [_first_stage_line(d["first_stage"], d.get("reconstruction")), ""]
        for objective, o in (d.get("objectives") or {}).items():
            lines += [
                f"objective {objective}, same budget: "
                + (
                    f"failed: {o['error']}"
                    if "error" in o
                    else f"{o['steps']} steps in {o['wall_s']:.0f} s, {o['samples_per_s']:.1f} samples/s, "
                    f"final loss {o['final_loss']:.4f}"
                ),
                "",
            ]
        keys = _metric_keys(d["sampling"])
        lines.append(
            _row(["objective", "sampler", "steps", "NFE", "guidance", "samples/s", "wall s", "peak MiB", *keys])
        )
        lines.append(_row(["---"] * (8 + len(keys))))
        if d.get("reference"):
            ref = d["reference"]
            label = f"real data ({ref['num_samples']} held-out)" if "num_samples" in ref else "real data (reference)"
            lines.append(_row([label, "", "", "", "", "", "", "", *(_fmt(ref.get(k, "")) for k in keys)]))
        if d.get("reconstruction"):  # a latent model's ceiling: its first stage's encode-decode of held-out data
            rec = d["reconstruction"]
            stage = (d.get("first_stage") or {}).get("autoencoder")
            label = f"first stage{f' `{stage}`' if stage else ''} reconstruction" + (
                f" ({rec['num_samples']} held-out)" if "num_samples" in rec else ""
            )
            lines.append(_row([label, "", "", "", "", "", "", "", *(_fmt(rec.get(k, "")) for k in keys)]))
        for r in d["sampling"]:
            speed = f"{r['samples_per_s']:.2f}" + (
                f" ({r['audio_seconds_per_s']:.1f} s audio/s)" if "audio_seconds_per_s" in r else ""
            )
            lines.append(
                _row(
                    [
                        r.get("objective", "vp"),
                        r["sampler"],
                        r["steps"] or "adaptive",
                        _nfe(r.get("nfe", r["steps"])),
                        r["guidance"],
                        speed,
                        f"{r['wall_s']:.2f}",
                        f"{r['peak_mem_mb']:.0f}",
                        *(_fmt(r["metrics"].get(k, "")) for k in keys),
                    ]
                )
            )
        for r in d.get("sampling_errors", []):
            cells = [r.get("objective", "vp"), r["sampler"], r["steps"], "", r["guidance"], f"failed: {r['error']}"]
            lines.append(_row(cells))
        lines += [
            "",
            "training throughput against batch size: "
            + ", ".join(
                f"{x['batch_size']}: {x['samples_per_s']:.1f}/s ({x['peak_mem_mb']:.0f} MiB)"
                for x in d["throughput_vs_batch"]
            ),
            "",
        ]
        if d.get("throughput_vs_size"):
            lines += [
                f"training throughput against {d['throughput_vs_size'][0]['axis']} "
                f"(batch {d['throughput_vs_size'][0]['batch_size']}): "
                + ", ".join(
                    f"{x['size']}: {x['samples_per_s']:.1f}/s ({x['peak_mem_mb']:.0f} MiB)"
                    for x in d["throughput_vs_size"]
                ),
                "",
            ]
        if d.get("compile"):
            c = d["compile"]
            if "error" in c:
                lines += [f"torch.compile check failed: {c['error']}", ""]
            else:
                lines += [
                    f"torch.compile, training at batch {c['batch_size']}: "
                    f"eager {c['eager_samples_per_s']:.1f}/s, compiled "
                    f"{c['compiled_samples_per_s']:.1f}/s (x{c['ratio_compiled_over_eager']:.2f}), "
                    f"compiled in {c['compile_s']:.0f} s",
                    "",
                ]
        for peer, p in d.get("peers", {}).items():
            if peer == "diffusers" and "samplers" in p:
                lines += _diffusers_table(p, keys)
            else:
                lines.append(f"peer `{peer}`: " + _peer_line(p))
        lines.append("")
    if result.get("audio_latent_vs_audio"):
        lines += _latent_speed_table(result["audio_latent_vs_audio"])
    text = "\n".join(lines)
    if path is not None:
        path.write_text(text)
    return text


def _nll_line(nll: dict[str, Any]) -> str:
    """The variational bound on held-out data at the start of training and after it (or why there is none)."""
    start, trained = nll["start"], nll["trained"]
    if "error" in trained:
        return f"NLL: none ({trained['error']})"
    return (
        f"NLL (variational bound, {trained['n']} held-out items, {trained['steps']} strata, {trained['decoder']}): "
        f"{start['nll_bpd']:.3f} bits/dim at the start of training, {trained['nll_bpd']:.3f} "
        f"± {trained['nll_bpd_sem']:.3f} after it ({trained['nll_nats']:.1f} nats per item)"
    )


def _first_stage_line(f: dict[str, Any], rec: Optional[dict[str, Any]]) -> str:
    """A latent model's first stage: its one-off encoding (cold cache), its own training where it has one, and the
    reconstruction figures the metric columns do not show (SI-SDR, STFT distance)."""
    line = (
        f"first stage `{f['autoencoder']}` ({f['kind']}), apart from the training above: {f['encoded_items']} "
        f"training items {f['data_shape']} encoded to {f['latent_shape']} in {f['encode_train_s']:.2f} s (cold cache)"
    )
    if f["kind"] == "trained":
        line += (
            f"; its own training: {f['training_steps']} steps in {f['training_s']:.0f} s"
            if f.get("training_s") is not None
            else f"; its own training: {f['training_steps']} steps, time unknown ({f.get('training_note', '')})"
        )
    if rec:
        extra = {k: v for k, v in rec.items() if k in ("si_sdr", "mrstft")}
        if extra:
            line += "; reconstruction " + ", ".join(f"{k} {_fmt(v)}" for k, v in extra.items())
    return line


def _latent_speed_table(rows: list[dict[str, Any]]) -> list[str]:
    """Seconds of audio per second, latent against waveform audio, at equal sampler, steps and guidance."""
    lines = [
        "## audio_latent against audio",
        "",
        "seconds of audio generated per second (samples/s x clip duration) at equal sampler, steps and guidance:",
        "",
        _row(["objective", "sampler", "steps", "guidance", "audio s/s", "audio_latent s/s", "latent / waveform"]),
        _row(["---"] * 7),
    ]
    for r in rows:
        lines.append(
            _row(
                [
                    r["objective"],
                    r["sampler"],
                    r["steps"],
                    r["guidance"],
                    f"{r['audio_s_per_s']:.2f}",
                    f"{r['audio_latent_s_per_s']:.2f}",
                    f"x{r['ratio_latent_over_waveform']:.2f}",
                ]
            )
        )
    return lines + [""]


def _diffusers_table(p: dict[str, Any], keys: list[str]) -> list[str]:
    """diffusers' schedulers on the trained network: time, agreement and metrics beside polydiff's."""
    metric = [f"{keys[0]} polydiff", f"{keys[0]} diffusers"] if keys else []  # a domain without metrics: none
    lines = [
        "",
        f"peer `diffusers` (its schedulers driving the trained network, {p['num_samples']} samples, same noise):",
        "",
        _row(["sampler", "steps", "polydiff s", "diffusers s", "ratio", "max rel. diff", *metric]),
        _row(["---"] * (6 + len(metric))),
    ]
    for r in p["samplers"].values():
        values = (
            [_fmt(r["metrics_polydiff"].get(keys[0], "")), _fmt(r["metrics_diffusers"].get(keys[0], ""))]
            if keys
            else []
        )
        lines.append(
            _row(
                [
                    r["sampler"],
                    r["steps"],
                    f"{r['polydiff_s']:.2f}",
                    f"{r['diffusers_s']:.2f}",
                    f"{r['ratio_polydiff_over_diffusers']:.2f}",
                    f"{r['max_rel_diff']:.1e}",
                    *values,
                ]
            )
        )
    return lines + [""]


def _nfe(value: float) -> str:
    """Network calls per sample: whole for a fixed grid, one decimal for an adaptive solver's mean over chunks."""
    return str(int(value)) if float(value).is_integer() else f"{value:.1f}"


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
        return [write_page(result, folder, written)]
    # Quality against the network calls per sample, per domain, objective and sampler (first metric of the domain).
    fig, axes = plt.subplots(1, len(domains), figsize=(4.5 * len(domains), 3.6), squeeze=False)
    for ax, (name, d) in zip(axes[0], domains.items()):
        keys = _metric_keys(d["sampling"])
        if not keys:
            ax.set_title(f"{name}: no metrics")
            continue
        key = keys[0]
        curves = sorted({(r.get("objective", "vp"), r["sampler"], r["guidance"]) for r in d["sampling"]})
        for objective, sampler, g in curves:
            rows = sorted(
                (
                    r
                    for r in d["sampling"]
                    if (r.get("objective", "vp"), r["sampler"], r["guidance"]) == (objective, sampler, g)
                ),
                key=lambda r: r.get("nfe", r["steps"]),
            )
            ax.plot(
                [r.get("nfe", r["steps"]) for r in rows],
                [r["metrics"].get(key, float("nan")) for r in rows],
                "o-" if objective == "vp" else "s--",
                label=f"{objective} {sampler}" + (f" w={g}" if g != 1.0 else ""),
            )
        if key in d.get("reference", {}):
            ax.axhline(d["reference"][key], color="k", ls="--", lw=1, label="real data")
        ax.set_xscale("log")
        ax.set_xlabel("network calls per sample (NFE)")
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
    written.append(write_page(result, folder, written))
    return written


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


SAMPLES_PER_DOMAIN = 8  # drawn from each trained run for the page
MAX_SAMPLER_STEPS = 20  # the page's draw is a look, not a measurement: a few sampler steps suffice


def write_page(result: dict[str, Any], folder: Path, plots: list[Path]) -> Path:
    """``folder/report.html``: the result's tables and plots, and a few samples of each domain's trained run (from
    ``runs/TAG/DOMAIN`` beside the result), on one offline page like ``polydiff report``'s."""
    from polydiff.report_html import data_uri, esc, page_html

    images = [f'<img class="plot" alt="{esc(p.stem)}" src="{data_uri("image/png", p.read_bytes())}">' for p in plots]
    sections = [("plots", "Plots", "".join(images))]
    for name, block in _markdown_sections(write_markdown(result, None)):
        run = folder.parent / "runs" / folder.name / name
        sections.append((f"domain-{name}", name, block + _samples(run, result["seed"])))
    env = result["environment"]
    subtitle = (
        f"suite {esc(result['suite'])} on {esc(env['device_name'])}, commit {esc(env['git_commit'][:12])}, "
        f"torch {esc(env['torch'])}, {esc(env['date'])}"
    )
    path = folder / "report.html"
    path.write_text(page_html(f"polydiff bench ({result['suite']})", subtitle, sections), encoding="utf-8")
    return path


def _markdown_sections(text: str) -> list[tuple[str, str]]:
    """The Markdown report's ``## domain`` parts as HTML: its tables (real-data rows marked) and lines of text."""
    from polydiff.report_html import esc, table_html

    sections: list[tuple[str, list[str]]] = []
    rows: list[list[str]] = []

    def flush() -> None:
        if rows and sections:
            real = [i for i, r in enumerate(rows[1:]) if r[0].startswith("real data")]
            sections[-1][1].append(table_html(rows[0], rows[1:], real_rows=real))
        rows.clear()

    for line in text.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if set("".join(cells)) - {"-"}:  # not the separator row under a header
                rows.append(cells)
            continue
        flush()
        if line.startswith("## "):
            sections.append((line[3:].strip(), []))
        elif line.strip() and sections:
            sections[-1][1].append(f"<p>{esc(line).replace('`', '')}</p>")
    flush()
    return [(name, "".join(parts)) for name, parts in sections]


def _samples(run: Path, seed: int) -> str:
    """A few samples of a trained bench run, drawn anew from its checkpoint, beside real ones; a note where none."""
    import torch

    from polydiff.build import load_run, resolve_device
    from polydiff.generate import generate
    from polydiff.report import samples_html
    from polydiff.report_html import esc

    if not (run / "checkpoints" / "last.pt").is_file():
        return f'<p class="note">no samples: no trained run at {esc(run)} (a merged result, or a run moved away)</p>'
    try:
        device = resolve_device("auto")
        parts, ckpt = load_run(run, device=device)
        sampler = dict(ckpt["config"]["sampler"])
        sampler["steps"] = min(int(sampler["steps"]), MAX_SAMPLER_STEPS)
        n = SAMPLES_PER_DOMAIN
        batch = generate(
            parts.domain,
            parts.net,
            parts.schedule,
            parts.objective,
            n,
            sampler=sampler,
            guidance=ckpt["config"]["guidance"],
            labels=parts.domain.default_labels(n, device),
            device=device,
            generator=torch.Generator(device=device).manual_seed(seed),
        )
        return f"<h3>samples ({esc(sampler['name'])}, {sampler['steps']} steps)</h3>" + samples_html(
            parts.domain, batch.to("cpu"), n, real=False
        )
    except Exception as err:  # noqa: BLE001 -- the page still shows the measurements
        return f'<p class="note">no samples: {esc(type(err).__name__)}: {esc(err)}</p>'
