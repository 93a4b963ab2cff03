"""The report page's HTML: one self-contained file that needs no network or server. Pictures (PNG) and sounds (WAV)
are inlined as data: URIs; the style (``report.css``) and the 3-D molecule viewer (``report.js``) are inlined from
the package."""

from __future__ import annotations

import base64
import html
import json
from importlib import resources
from typing import Any, Iterable, Optional, Sequence

from .report_items import ReportItem, wav_bytes

__all__ = ["data_uri", "esc", "fmt", "table_html", "items_html", "page_html"]


def data_uri(mime: str, data: bytes) -> str:
    """``data:MIME;base64,...``: a file inlined into the page."""
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def esc(value: Any) -> str:
    """Text made safe for HTML (and for double-quoted attributes)."""
    return html.escape(str(value), quote=True)


def fmt(value: Any) -> str:
    """A table cell: floats to 4 significant digits, nothing for ``None``."""
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def table_html(
    header: Sequence[str], rows: Iterable[Sequence[Any]], real_rows: Sequence[int] = (), cls: str = ""
) -> str:
    """A table of class ``cls``; the rows whose indices are in ``real_rows`` are marked as real data."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join(
        ("<tr class='real'>" if i in real_rows else "<tr>") + "".join(f"<td>{esc(fmt(c))}</td>" for c in row) + "</tr>"
        for i, row in enumerate(rows)
    )
    return f"<table{f' class={cls!r}' if cls else ''}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _picture(png: Optional[bytes], alt: str, cls: str = "") -> str:
    if png is None:
        return ""
    return f'<img{f" class={cls!r}" if cls else ""} alt="{esc(alt)}" src="{data_uri("image/png", png)}">'


def item_html(item: ReportItem) -> str:
    """One sample (or real one) as a ``<figure>``: its picture, a player for a clip, a rotatable view of a molecule."""
    body = ""
    if item.kind == "audio":
        wav, rate = wav_bytes(item.wave, item.sample_rate)
        note = f" (played at {rate} Hz)" if rate != item.sample_rate else ""
        body = (
            _picture(item.png, f"spectrogram of {item.title}")
            + f'<audio controls preload="metadata" title="{esc(item.title)}{esc(note)}" '
            f'src="{data_uri("audio/wav", wav)}"></audio>'
        )
    elif item.kind == "image":
        body = _picture(item.png, item.title)
    elif item.kind == "molecule":
        mol = {
            "atoms": list(item.atoms),
            "pos": [[round(float(v), 3) for v in p] for p in item.positions],
            "bonds": [[int(i), int(j), int(k)] for i, j, k in item.bonds],
        }
        body = (
            f'<div class="views">{_picture(item.png, f"2-D depiction of {item.title}")}'
            f'<canvas class="mol3d" width="220" height="220" title="drag to rotate" '
            f'data-mol="{esc(json.dumps(mol, separators=(",", ":")))}"></canvas></div>'
        )
    elif item.kind == "text":
        body = f"<pre>{esc(item.text)}</pre>" + _picture(item.png, item.title)
    real = " real" if item.real else ""
    caption = ('<span class="tag">real</span> ' if item.real else "") + esc(item.title)
    return f'<figure class="item {item.kind}{real}">{body}<figcaption>{caption}</figcaption></figure>'


def items_html(items: Sequence[ReportItem], real: Sequence[ReportItem] = ()) -> str:
    """Samples grouped by label (in order of first appearance), each group's real data beside its samples."""
    groups: dict[str, tuple[list[ReportItem], list[ReportItem]]] = {}
    for item in items:
        groups.setdefault(item.group, ([], []))[0].append(item)
    for item in real:
        groups.setdefault(item.group, ([], []))[1].append(item)
    out = []
    for group, (made, reals) in groups.items():
        heading = f"<h4>{esc(group)}</h4>" if group or len(groups) > 1 else ""
        if not group and len(groups) > 1:
            heading = "<h4>unlabelled</h4>"
        out.append(
            f'<div class="group">{heading}<div class="items">'
            + "".join(item_html(i) for i in [*made, *reals])
            + "</div></div>"
        )
    return "".join(out)


def _asset(name: str) -> str:
    """A file shipped with polydiff beside this module (the page's style and script)."""
    return resources.files("polydiff").joinpath(name).read_text(encoding="utf-8")


def page_html(title: str, subtitle: str, sections: Sequence[tuple[str, str, str]]) -> str:
    """The whole page: a header, a table of contents and ``sections`` as ``(id, heading, body HTML)``."""
    nav = "".join(f'<a href="#{esc(sid)}">{esc(heading)}</a>' for sid, heading, _ in sections)
    body = "".join(
        f'<section id="{esc(sid)}"><h2>{esc(heading)}</h2>{content}</section>' for sid, heading, content in sections
    )
    # "</" inside the inlined script or style would end its element early: none may hold it.
    script, style = _asset("report.js"), _asset("report.css")
    if "</" in script or "</" in style:
        raise ValueError("report.js and report.css must not contain '</' (it would end the inlined element)")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{style}</style></head><body>"
        f'<header><h1>{esc(title)}</h1><div class="meta">{subtitle}</div><nav>{nav}</nav></header>'
        f"{body}<script>{script}</script></body></html>\n"
    )
