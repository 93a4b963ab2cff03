"""The report page (``polydiff report``, written by training and ``polydiff sample``) and TensorBoard media: what each
domain shows, a self-contained offline page, and the page loaded in headless Chromium as a person would see it."""

import base64
import io
import json
import logging
import os
import re
import select
import subprocess
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pytest
import torch
from PIL import Image

import polydiff
from polydiff.cli import main
from polydiff.recipes import compose_recipe
from polydiff.report_items import ReportItem, dense_plot, wav_bytes
from polydiff.trainer import train

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--mute-audio",
    "--remote-debugging-pipe",
]
POINTS = [
    "domain.size=64",
    "model.width=16",
    "model.depth=1",
    "trainer.batch_size=16",
    "trainer.num_samples=64",
    "trainer.ckpt_every=2",
    "trainer.sample_every=2",
    "trainer.log_every=1",
    "sampler.steps=2",
]
AUDIO_NET = dict(channels=8, channel_mults=[1, 2], down_factors=[4], num_res_blocks=1, mid_attention=False)
SHORT = [
    "profile=cpu",
    "trainer.max_steps=4",
    "trainer.batch_size=4",
    "trainer.log_every=1",
    "trainer.sample_every=2",
    "trainer.ckpt_every=1000",
    "trainer.progress=false",
    "trainer.eval=false",
    "sampler.steps=2",
]
needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="headless Chromium (/usr/bin/chromium) is not installed: apt-get install chromium, as .ci/run does",
)


def _png_ok(data: bytes) -> tuple[int, int]:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image.size


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny runs of the example and the three domains, each scored at steps 2 and 4 (reports written by training)."""
    root = tmp_path_factory.mktemp("runs")
    mp = pytest.MonkeyPatch()
    mp.setenv("POLYDIFF_CACHE", str(root / "cache"))
    try:
        main(
            [
                "train",
                str(ROOT / "examples" / "points.yaml"),
                *POINTS,
                "trainer.max_steps=4",
                f"hydra.run.dir={root / 'points'}",
            ]
        )
        train(
            {
                "domain": {"name": "audio", "sample_rate": 2000, "duration": 0.5, "limit": 60, "classifier_epochs": 1},
                "model": AUDIO_NET,
                "schedule": {"name": "cosine", "steps": 100},
                "objective": {"prediction": "v"},
                "trainer": dict(
                    max_steps=4, batch_size=8, device="cpu", num_samples=10, progress=False, sample_every=2, log_every=1
                ),
                "sampler": {"name": "ddim", "steps": 2},
            },
            root / "audio",
        )
        train(
            compose_recipe(
                ROOT / "recipes" / "image_unet.yaml", [*SHORT, "model.channels=8", "trainer.num_samples=20"]
            ),
            root / "image",
        )
        train(
            compose_recipe(
                ROOT / "recipes" / "molecule_egnn.yaml",
                [
                    *SHORT,
                    "domain.max_molecules=10",
                    "domain.num_conformers=1",
                    "model.hidden=16",
                    "model.layers=2",
                    "trainer.num_samples=4",
                ],
            ),
            root / "molecule",
        )
    finally:
        mp.undo()
    return {name: root / name for name in ("points", "audio", "image", "molecule")}


# ------------------------------------------------------------------ items and the dense default
@pytest.mark.parametrize("shape", [(50, 1), (50, 2), (6, 5), (3, 2, 16), (3, 12, 16), (3, 1, 8, 8)])
def test_dense_samples_of_one_and_two_dimensions_are_plotted(shape):
    assert min(_png_ok(dense_plot(torch.randn(shape)))) > 50


def test_shapes_without_a_plot_are_described_in_text(tmp_path):
    assert dense_plot(torch.randn(2, 2, 2, 2, 2)) is None and dense_plot(torch.full((3, 2), float("nan"))) is None
    domain = polydiff.Domain()
    batch = polydiff.Batch(torch.randn(2, 2, 2, 2, 2), polydiff.DenseSpace((2, 2, 2, 2, 2)))
    (item,) = domain.outputs.report_items(batch)
    assert item.kind == "text" and "states (2, 2, 2, 2, 2)" in item.text


def test_default_outputs_write_a_plot_beside_the_samples_and_show_it(tmp_path):
    domain = polydiff.Domain()
    batch = polydiff.Batch(torch.randn(40, 2), polydiff.DenseSpace((40, 2)))
    (path,) = domain.save_samples(batch, tmp_path, prefix="step_0000010")
    assert path.name == "step_0000010.pt" and _png_ok((tmp_path / "step_0000010.png").read_bytes())
    (item,) = domain.outputs.report_items(sorted(tmp_path.iterdir()), limit=5)
    assert item.kind == "image" and item.title == "40 samples"  # one scatter of them all: the limit caps items


def test_report_items_are_checked():
    with pytest.raises(ValueError, match="kind 'video' is unknown"):
        ReportItem("video")
    with pytest.raises(ValueError, match="needs wave"):
        ReportItem("audio", title="a")
    with pytest.raises(ValueError, match="one position"):
        ReportItem("molecule", atoms=["C"], positions=np.zeros((2, 3)))


def test_clips_below_what_browsers_play_are_upsampled():
    wav, rate = wav_bytes(np.sin(np.arange(1000) / 5)[None], 2000)
    assert rate == 8000 and len(wav) == 44 + 4 * 1000 * 2  # a header and 4x the samples, 16-bit
    assert wav_bytes(np.zeros((1, 100)), 16000)[1] == 16000


# ------------------------------------------------------------------ pages
def _page(path: Path) -> str:
    text = path.read_text()
    # Self-contained: nothing is fetched (no http(s) anywhere, every src a data: URI; links only within the folder).
    assert not re.search(r"https?://", text)
    assert all(s.startswith("data:") for s in re.findall(r'\bsrc="([^"]*)"', text))
    assert all(h.startswith("#") or not re.match(r"^\w+:", h) for h in re.findall(r'\bhref="([^"]*)"', text))
    return text


def test_a_run_page_holds_curves_metrics_samples_and_earlier_steps(runs, tmp_path):
    text = _page(runs["points"] / "report.html")
    assert "Samples at step 4" in text and "<h3>step 2</h3>" in text and "training and metric curves" in text
    assert re.search(r"<td>step 2</td><td>[\d.]+</td>", text) and "dist_to_centre" in text
    assert "real</span>" in text and "examples.points:PointsDomain" in text  # real data, the recipe
    # polydiff sample writes its own page, which the run's page links once written again.
    out = runs["points"] / "samples" / "draw"
    main(["sample", str(runs["points"]), "--n", "30", "--out", str(out), "sampler.steps=2", "--seeds", "2"])
    page = _page(out / "report.html")
    assert "Samples (seed-0)" in page and "Samples (seed-1)" in page and "dpmpp_2m" in page
    main(["report", str(runs["points"])])
    assert 'href="samples/draw/report.html"' in _page(runs["points"] / "report.html")


def test_the_audio_page_has_a_player_and_spectrogram_per_clip_and_the_reference_row(runs):
    text = _page(runs["audio"] / "report.html")
    players = re.findall(r'<audio controls preload="metadata" title="([^"]*)" src="data:audio/wav;base64,', text)
    real = text.count('<figure class="item audio real">')
    assert len(players) - real == 10 + 6 and real >= 6  # every clip of step 4, 6 of step 2; real ones beside
    assert all("played at 8000 Hz" in title for title in players)  # the 2 kHz clips, raised to a rate browsers play
    assert re.search(r"<tr class='real'><td>real data \(10 held-out\)</td>", text)
    assert "<h4>zero</h4>" in text and "Hz (mel bands)" not in text  # grouped by label; the axes are in the PNGs


def test_report_command_needs_a_run_or_samples_folder(tmp_path, runs):
    with pytest.raises(SystemExit, match="is neither a run folder .* nor a folder written by polydiff sample"):
        main(["report", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"takes domain.KEY=V settings only, not \['sampler.steps=3'\]"):
        main(["report", str(runs["points"]), "sampler.steps=3"])


def test_a_page_that_cannot_be_drawn_warns_and_training_goes_on(tmp_path, monkeypatch, caplog):
    import polydiff.report

    def broken(*args, **kwargs):
        raise RuntimeError("no fonts")

    monkeypatch.setattr(polydiff.report, "write_report", broken)
    with caplog.at_level(logging.WARNING, logger="polydiff"):
        train(compose_recipe(ROOT / "examples" / "points.yaml", [*POINTS, "trainer.max_steps=2"]), tmp_path / "run")
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()
    assert "the report could not be written (RuntimeError: no fonts); training goes on" in caplog.text


def test_tensorboard_gets_clips_pictures_and_molecule_drawings(runs, tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install tensorboard)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = {}
    for name in ("audio", "molecule", "image"):
        events = EventAccumulator(str(runs[name] / "tensorboard"), size_guidance={"audio": 0, "images": 0})
        events.Reload()
        tags[name] = events.Tags()
    assert "samples/zero/000" in tags["audio"]["audio"] and "samples/zero/000/spectrogram" in tags["audio"]["images"]
    assert "samples/molecule/000/depiction" in tags["molecule"]["images"]
    assert "samples/0/000" in tags["image"]["images"]
    events = EventAccumulator(str(runs["audio"] / "tensorboard"), size_guidance={"audio": 0})
    events.Reload()
    assert [e.step for e in events.Audio("samples/zero/000")] == [2, 4]


@pytest.fixture(scope="module")
def bench_page(runs, tmp_path_factory):
    """The page of a stored bench result, its points run standing in for the bench's own (others have none here)."""
    from benchmarks.report import write_plots

    out = tmp_path_factory.mktemp("bench")
    result = json.loads((ROOT / "benchmarks" / "results" / "20261129-042021_quick_cpu.json").read_text())
    (out / "runs" / "TAG").mkdir(parents=True)
    (out / "runs" / "TAG" / "points").symlink_to(runs["points"])
    written = write_plots(result, out / "TAG")
    assert written[-1] == out / "TAG" / "report.html" and all(p.is_file() for p in written)
    return written[-1]


def test_the_bench_page_holds_tables_plots_and_samples(bench_page):
    text = _page(bench_page)
    for name in ("quality_vs_steps", "loss_curves", "scaling"):
        assert f'alt="{name}"' in text
    assert "<td>dpmpp_2m</td>" in text and "real data (100 held-out)" in text  # the tables, the reference rows
    assert "samples (dpmpp_2m, 2 steps)" in text and "8 samples" in text  # drawn from the trained points run
    assert text.count("no samples: no trained run at") == 3  # image, audio, molecule: none beside this result


# ------------------------------------------------------------------ in a browser
class Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``: no package beyond
    the standard library); :meth:`open` loads a page and records its errors and network requests."""

    def __init__(self, profile: Path, timeout: float = 60.0) -> None:
        self.timeout, self.events, self._id, self._buf = timeout, [], 0, b""
        to_chrome, from_chrome = os.pipe(), os.pipe()
        # Chromium reads commands on fd 3 and writes replies on fd 4: park the pipe ends high, then move them there.
        high = {30: to_chrome[0], 31: from_chrome[1]}
        for fd, end in high.items():
            os.dup2(end, fd)

        def child_fds() -> None:
            os.dup2(30, 3)
            os.dup2(31, 4)

        self.proc = subprocess.Popen(
            [str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", "about:blank"],
            preexec_fn=child_fds,
            close_fds=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for fd in (*high, to_chrome[0], from_chrome[1]):
            os.close(fd)
        self._out, self._in = to_chrome[1], from_chrome[0]

    def call(self, method: str, params: Optional[dict[str, Any]] = None, session: Optional[str] = None) -> Any:
        """Send one command and wait for its result (events that arrive meanwhile are kept in :attr:`events`)."""
        self._id += 1
        message = {"id": self._id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._out, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._next()
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def _next(self) -> dict[str, Any]:
        deadline = time.monotonic() + self.timeout
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._in], [], [], left)[0]:
                raise TimeoutError(f"Chromium sent nothing for {self.timeout:.0f} s")
            chunk = os.read(self._in, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed its DevTools pipe (it crashed or could not start)")
            self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def open(self, url: str, width: int = 1280, height: int = 900) -> str:
        """Load ``url`` in a new tab and wait for its load event; returns the tab's session id."""
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable", session=session)
        self.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
            session=session,
        )
        self.call("Page.navigate", {"url": url}, session=session)
        while not any(e.get("method") == "Page.loadEventFired" and e.get("sessionId") == session for e in self.events):
            self.events.append(self._next())
        return session

    def evaluate(self, session: str, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises awaited)."""
        result = self.call(
            "Runtime.evaluate", {"expression": expression, "awaitPromise": True, "returnByValue": True}, session=session
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:60]}...: {result['exceptionDetails']}")
        return result["result"].get("value")

    def screenshot(self, session: str, clip: Optional[dict[str, float]] = None, full: bool = False) -> bytes:
        """A PNG of the viewport, of a ``clip`` rectangle (page pixels), or of the ``full`` page."""
        params: dict[str, Any] = {"format": "png"}
        if full:
            size = self.call("Page.getLayoutMetrics", session=session)["cssContentSize"]
            clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"]}
        if clip is not None:
            params.update(clip={**clip, "scale": 1}, captureBeyondViewport=True)
        return base64.b64decode(self.call("Page.captureScreenshot", params, session=session)["data"])

    def errors(self) -> list[str]:
        """Uncaught exceptions, console.error calls and error log entries (failed loads) seen so far."""
        out = []
        for e in self.events:
            method, params = e.get("method"), e.get("params", {})
            if method == "Runtime.exceptionThrown":
                out.append(json.dumps(params["exceptionDetails"])[:500])
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                out.append(" ".join(str(a.get("value", a.get("description"))) for a in params.get("args", [])))
            elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                out.append(params["entry"].get("text", ""))
        return out

    def requests(self) -> list[str]:
        """Every URL the pages asked the network for."""
        return [e["params"]["request"]["url"] for e in self.events if e.get("method") == "Network.requestWillBeSent"]

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._out)
        os.close(self._in)


_LOADED = """(async () => {
  const audios = [...document.querySelectorAll('audio')];
  await Promise.all(audios.map(a => a.readyState >= 1 ? 0 : new Promise(done => {
    a.addEventListener('loadedmetadata', done); a.addEventListener('error', done); })));
  await Promise.all([...document.images].map(i => i.decode().catch(() => 0)));
  const canvas = document.querySelector('canvas.mol3d'), box = canvas && canvas.getBoundingClientRect();
  return {durations: audios.map(a => a.duration), errors: audios.filter(a => a.error).map(a => a.error.message),
          images: [...document.images].map(i => i.naturalWidth), canvases: document.querySelectorAll('canvas').length,
          canvas: box && {x: box.left + scrollX, y: box.top + scrollY, width: box.width, height: box.height}};
})()"""


@needs_chromium
def test_pages_load_in_a_browser_with_sound_pictures_and_a_rotatable_3d_view(runs, bench_page, tmp_path):
    browser = Browser(tmp_path / "profile")
    pages = {
        **{name: run / "report.html" for name, run in runs.items()},
        "bench": bench_page,
        "draw": runs["audio"] / "samples" / "draw" / "report.html",
    }
    main(["sample", str(runs["audio"]), "--n", "3", "--out", str(pages["draw"].parent), "sampler.steps=2"])
    try:
        seen = {}
        for name, page in pages.items():
            session = browser.open(page.as_uri())
            seen[name] = state = browser.evaluate(session, _LOADED)
            assert state["images"] and all(w > 0 for w in state["images"]), (name, state["images"])
            assert not state["errors"] and all(d > 0 and np.isfinite(d) for d in state["durations"]), (name, state)
            if name == "molecule":
                shot = Image.open(io.BytesIO(browser.screenshot(session, clip=state["canvas"]))).convert("RGB")
                colours = len(np.unique(np.asarray(shot).reshape(-1, 3), axis=0))
                assert colours > 20, f"the 3-D view drew {colours} colour(s)"
                # Dragging across the view rotates the molecule: its pixels change.
                x, y = state["canvas"]["x"] + 100, state["canvas"]["y"] + 100
                browser.call("Runtime.evaluate", {"expression": f"scrollTo(0, {y - 200})"}, session=session)
                top = y - browser.evaluate(session, "scrollY")
                for kind, dx in (("mousePressed", 0), ("mouseMoved", 60), ("mouseReleased", 60)):
                    browser.call(
                        "Input.dispatchMouseEvent",
                        {"type": kind, "x": x + dx, "y": top, "button": "left", "buttons": 1, "clickCount": 1},
                        session=session,
                    )
                after = Image.open(io.BytesIO(browser.screenshot(session, clip=state["canvas"]))).convert("RGB")
                assert not np.array_equal(np.asarray(after), np.asarray(shot)), "dragging did not rotate the 3-D view"
        assert len(seen["audio"]["durations"]) > 20 and seen["molecule"]["canvases"] >= 4
        assert browser.errors() == []
        assert {u.split(":", 1)[0] for u in browser.requests()} <= {"file", "data"}  # nothing from the network
    finally:
        browser.close()
