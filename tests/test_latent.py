"""Latent diffusion (``latent.autoencoder``): the mel first stage, the latent domain wrapper, its cache, its outputs in
the data's space, its checkpoint state and its bad inputs."""

import json
from pathlib import Path

import pytest
import soundfile as sf
import torch

from domains.audio.distances import mrstft_distance, si_sdr
from domains.audio.domain import AudioDomain
from domains.audio.mel_stage import MelAutoencoder
from polydiff import Batch, DenseSpace
from polydiff.build import Parts, build_domain, load_first_stage
from polydiff.cli import main
from polydiff.config import check_keys
from polydiff.latent import LatentDomain, latent_domain, latent_mask
from polydiff.safety import UnsafeConfigError, check_config

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "audio_latent.yaml"
# 20 clips a split, 0.3 s at 16 kHz (19 frames of 64 mels), no metric classifier: seconds, not minutes.
SMALL = dict(sample_rate=16000, duration=0.3, limit=20, metrics=False)
TINY_NET = dict(channels=8, channel_mults=[1, 2], down_factors=[2], num_res_blocks=1, mid_attention=False)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("POLYDIFF_CACHE", str(tmp_path / "cache"))


def _latent(**audio) -> LatentDomain:
    domain = latent_domain(AudioDomain(**{**SMALL, **audio}), {"autoencoder": "mel"})
    domain.setup(domain.dataset("train"))
    return domain


def test_mel_stage_shapes_and_round_trip():
    """1 s at 16 kHz is 64 mels x 63 frames; decoding gives the clip's length, and its log-mel is close to the
    original's (Griffin-Lim recovers magnitudes, not phases)."""
    stage = MelAutoencoder(16000, 1, 16000, griffin_lim_iters=16)
    t = torch.arange(16000) / 16000
    x = (0.5 * torch.sin(2 * torch.pi * (300 + 400 * t) * t) * torch.hann_window(16000))[None, None]  # a chirp
    z = stage.encode(x)
    assert z.shape == (1, 64, 63)
    y = stage.decode(z)
    assert y.shape == x.shape and torch.isfinite(y).all()
    loud = z > z.max() - 6  # the bands within 26 dB of the peak (the rest is the log's floor)
    noise = 0.1 * torch.randn_like(x)
    assert (stage.encode(y) - z)[loud].abs().mean() < 1.0 < (stage.encode(noise) - z)[loud].abs().mean()
    assert torch.equal(stage.decode(z), y)  # a fixed Griffin-Lim start: the same latent gives the same clip
    assert mrstft_distance(x, y) < mrstft_distance(x, noise)
    assert si_sdr(x, 2 * x).item() > 50  # scale-invariant
    assert MelAutoencoder(16000, 1, 16000).identity != MelAutoencoder(8000, 1, 8000).identity


def test_the_named_mel_stages_and_a_low_rate_filter_bank():
    """``mel128`` is 128 bands decoded with 128 Griffin-Lim iterations; at 2 kHz, 64 bands span fewer bins than they
    are (rank 57 of 65), and the least-squares inverse still decodes."""
    wide = AudioDomain(**SMALL).autoencoder("mel128")
    assert wide.settings["n_mels"] == 128 and wide.settings["iters"] == 128
    assert wide.identity != AudioDomain(**SMALL).autoencoder("mel").identity
    x = 0.3 * torch.sin(2 * torch.pi * 440 * torch.arange(4800) / 16000)[None, None]
    assert wide.encode(x).shape == (1, 128, 19) and wide.decode(wide.encode(x)).shape == x.shape
    low = MelAutoencoder(2000, 1, 2000)
    y = low.decode(low.encode(0.3 * torch.sin(2 * torch.pi * 200 * torch.arange(2000) / 2000)[None, None]))
    assert y.shape == (1, 1, 2000) and torch.isfinite(y).all() and y.abs().max() > 0.05
    with pytest.raises(ValueError, match="128 mel bands need a wider window than 128 samples at 2000 Hz"):
        AudioDomain(**{**SMALL, "sample_rate": 2000}).autoencoder("mel128")


def test_latent_domain_encodes_once_normalises_and_builds_the_inner_network(monkeypatch):
    domain = _latent()
    data = domain.dataset("train")
    assert domain.sample_shape == (64, 19) and len(data) == 20
    z = data.z
    assert abs(float(z.mean())) < 1e-4 and abs(float(z.std()) - 1) < 1e-4  # the measured shift and scale
    batch = domain.collate([data[i] for i in range(4)])
    assert batch.x.shape == (4, 64, 19) and batch.cond["label"].shape == (4,)
    net = domain.build_network(**TINY_NET)
    assert net(batch.x, torch.rand(4), label=batch.cond["label"]).shape == batch.x.shape
    space, cond = domain.prior(3, labels=torch.tensor([0, 1, 2]))
    assert space.shape == (3, 64, 19) and cond["label"].tolist() == [0, 1, 2]

    # A second domain reads the cache rather than encoding again.
    def refuse(self, x):
        raise AssertionError("encoded again")

    monkeypatch.setattr(MelAutoencoder, "encode", refuse)
    again = latent_domain(AudioDomain(**SMALL), {"autoencoder": "mel"})
    assert torch.equal(again.dataset("train").z, z)


def test_a_changed_autoencoder_encodes_again_and_never_mixes(tmp_path):
    first = _latent()
    changed = latent_domain(AudioDomain(**SMALL), {"autoencoder": "mel"})
    changed.autoencoder = MelAutoencoder(16000, 1, changed.inner.length, n_mels=32)
    changed.setup(changed.dataset("train"))
    assert changed.sample_shape == (32, 19)
    files = sorted((tmp_path / "cache" / "latent").glob("*_train_*.pt"))
    assert len(files) == 2  # one cache file per autoencoder
    # A checkpoint's latent state from another autoencoder is refused, naming the key and the fix.
    with pytest.raises(ValueError, match=r"latent.autoencoder='mel' has changed since this model was trained"):
        changed.load_state_dict(first.state_dict())


def test_state_round_trip_and_the_plain_domain_loads_it():
    domain = _latent()
    state = domain.state_dict()
    fresh = latent_domain(AudioDomain(**SMALL), {"autoencoder": "mel"})
    fresh.load_state_dict(state)
    assert (fresh.sample_shape, fresh.shift, fresh.scale) == (domain.sample_shape, domain.shift, domain.scale)
    plain = AudioDomain(**SMALL)  # polydiff eval RUN builds the plain domain: the waveform files are its data
    plain.load_state_dict(state)
    assert plain.sample_shape == (1, 4800)
    with pytest.raises(ValueError, match="data-space model"):
        fresh.load_state_dict(plain.state_dict())


def test_decoding_clamps_each_channel_to_the_training_latents_range(monkeypatch):
    """A sampled latent beyond the training latents' per-channel range is clamped before decoding; the range travels
    with the checkpoint, and a checkpoint from before the clamp decodes unclamped."""
    domain = _latent()
    z = domain.dataset("train").z  # [N, C', F]
    assert torch.equal(domain.low, z.amin((0, 2))) and torch.equal(domain.high, z.amax((0, 2)))
    seen = []
    monkeypatch.setattr(MelAutoencoder, "decode", lambda self, raw: seen.append(raw) or raw)
    wild = torch.full((1, *domain.sample_shape), 100.0)
    wild[:, 0] = -100.0
    domain.decode(wild)
    clamped = (seen[-1] - domain.shift) / domain.scale
    assert torch.allclose(clamped[0, 1:, 0], domain.high[1:]) and torch.allclose(clamped[0, 0, 0], domain.low[0])
    inside = z[:1]
    domain.decode(inside)
    assert torch.allclose((seen[-1] - domain.shift) / domain.scale, inside, atol=1e-5)  # in range: untouched

    state = domain.state_dict()
    fresh = latent_domain(AudioDomain(**SMALL), {"autoencoder": "mel"})
    fresh.load_state_dict(state)
    assert torch.equal(fresh.low, domain.low) and torch.equal(fresh.high, domain.high)
    old = {**state, "latent": {k: v for k, v in state["latent"].items() if k not in ("low", "high")}}
    before = latent_domain(AudioDomain(**SMALL), {"autoencoder": "mel"})
    before.load_state_dict(old)
    before.decode(wild)
    assert torch.allclose((seen[-1] - before.shift) / before.scale, wild)  # unclamped, as it was trained and scored


def test_samples_are_decoded_before_they_are_saved_and_scored(tmp_path, monkeypatch):
    domain = _latent()
    data = domain.dataset("test")
    batch = domain.collate([data[i] for i in range(3)])
    paths = domain.save_samples(batch, tmp_path, prefix="s")
    wavs = [p for p in paths if p.suffix == ".wav"]
    assert len(wavs) == 3 and sf.read(wavs[0])[0].shape == (4800,)
    seen = []
    monkeypatch.setattr(AudioDomain, "evaluate", lambda self, b: seen.append(tuple(b.x.shape)) or {})
    domain.evaluate(batch)
    domain.evaluate(domain.read_samples(tmp_path))  # files read back are data already: not decoded again
    assert seen == [(3, 1, 4800), (3, 1, 4800)]

    # --known in latent space: the clip encoded, its wholly kept frames (less one of margin) held.
    kept = domain.known_values(wavs[0], 1, start=0.1)  # 0.1 s = 1600 of 4800 samples kept; 19 frames of ~253
    assert kept.values.shape == (1, 64, 19) and kept.mask.shape == (1, 1, 19)
    torch.testing.assert_close(kept.values, domain.encode(domain.read_samples(wavs[0]).x))
    assert kept.mask[0, 0].tolist() == [True] * 5 + [False] * 14  # 6 frames wholly in the first 1600, less 1
    drawn = torch.randn(2, 64, 19)
    x = domain.outputs.decoded(Batch(drawn, DenseSpace((2, 64, 19))))  # the kept stretch pasted back exactly
    original = domain.read_samples(wavs[0]).x[0]
    assert torch.equal(x.x[:, :, :1600], original[:, :1600].expand(2, -1, -1))
    assert not torch.equal(x.x[:, :, 1600:], original[:, 1600:].expand(2, -1, -1))
    with pytest.raises(ValueError, match="no latent position lies wholly in the kept part"):
        domain.known_values(wavs[0], 1, start=0.01)


def test_a_data_mask_maps_to_the_latent_positions_it_wholly_covers():
    mask = torch.ones(1, 1, 16, dtype=torch.bool)
    mask[..., 8:] = False  # the second half generated
    assert latent_mask(mask, (1, 16), (4, 4), margin=0)[0, 0].tolist() == [True, True, False, False]
    assert latent_mask(mask, (1, 16), (4, 4))[0, 0].tolist() == [True, False, False, False]
    assert latent_mask(mask, (1, 16), (4, 8), margin=0)[0, 0].tolist() == [True] * 4 + [False] * 4
    two = torch.ones(2, 3, 8, 8, dtype=torch.bool)
    two[0, 1, :4, :4] = False  # one channel's corner unknown: the corner is unknown
    got = latent_mask(two, (3, 8, 8), (4, 4, 4), margin=0)
    assert got.shape == (2, 1, 4, 4) and got[1].all()
    assert got[0, 0].logical_not().nonzero().tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]
    with pytest.raises(ValueError, match="need channels and the same 1 to 3 axes"):
        latent_mask(mask, (1, 16), (64, 4, 4))


def test_reconstruction_row_has_the_distances():
    row = _latent().outputs.reconstruction_metrics(8)
    assert set(row) == {"si_sdr", "mrstft", "num_samples"} and row["num_samples"] == 8  # metrics=false: no classifier
    assert row["mrstft"] < 3


def _args(run: Path, *extra: str) -> list[str]:
    return [
        "train",
        str(RECIPE),
        "profile=cpu",
        "domain.duration=0.3",
        "+domain.limit=20",
        "+domain.metrics=false",
        "model.channels=8",
        "model.channel_mults=[1,2]",
        "model.down_factors=[2]",
        "trainer.max_steps=2",
        "trainer.batch_size=4",
        "trainer.num_samples=2",
        "trainer.progress=false",
        "sampler.steps=2",
        f"hydra.run.dir={run}",
        *extra,
    ]


def test_train_and_sample_end_to_end(tmp_path, capsys):
    run = tmp_path / "run"
    main(_args(run))
    assert len(list((run / "samples").glob("step_0000002_*.wav"))) == 2
    out = tmp_path / "drawn"
    main(["sample", str(run), "--n", "2", "--out", str(out), "--eval", "sampler.steps=2", "label=seven"])
    wavs = sorted(out.glob("*.wav"))
    assert len(wavs) == 2 and all("seven" in w.name for w in wavs) and sf.read(wavs[0])[0].shape == (4800,)
    record = json.loads((out / "sampling.json").read_text())
    assert set(record["reconstruction"]) == {"si_sdr", "mrstft", "num_samples"}
    assert "first stage" in capsys.readouterr().out
    parts = Parts.from_config(torch.load(run / "checkpoints" / "last.pt", weights_only=True)["config"])
    assert isinstance(parts.domain, LatentDomain)
    # Continuation in latent space: the first 0.1 s of a clip kept exactly, the rest generated.
    args = ["sample", str(run), "--n", "2", "--out", str(tmp_path / "cont"), "--known", str(wavs[0])]
    main([*args, "known.start=0.1", "sampler.name=ddim", "sampler.steps=2"])
    clip = parts.domain.read_samples(wavs[0]).x[0, 0]
    for wav in sorted((tmp_path / "cont").glob("*.wav")):
        got = torch.from_numpy(sf.read(wav, dtype="float32")[0])
        torch.testing.assert_close(got[:1600], clip[:1600], rtol=0, atol=1e-4)  # 16-bit files
        assert (got[1600:] - clip[1600:]).abs().max() > 1e-2
    # A latent run is distilled like any run: its student samples decoded clips in one step.
    student = tmp_path / "student"
    main(["distill", str(run), "--method", "consistency", "objective.steps=4", f"hydra.run.dir={student}",
          "trainer.max_steps=1", "trainer.num_samples=2"])  # fmt: skip
    main(["sample", str(student), "--n", "2", "--out", str(tmp_path / "one")])
    assert len(list((tmp_path / "one").glob("*.wav"))) == 2


def test_bad_latent_inputs(tmp_path):
    with pytest.raises(KeyError, match="autoencodr"):
        check_keys({"latent": {"autoencodr": "mel"}})
    with pytest.raises(UnsafeConfigError, match="latent.autoencoder='os:system'"):
        check_config({"latent": {"autoencoder": "os:system"}})
    check_config({"latent": {"autoencoder": str(tmp_path / "ae")}})  # a path is data
    with pytest.raises(FileNotFoundError, match=r"latent.autoencoder=.*nowhere: no such run folder"):
        latent_domain(AudioDomain(**SMALL), {"autoencoder": str(tmp_path / "nowhere")}, load_first_stage)
    with pytest.raises(
        ValueError, match=r"latent.autoencoder=mol: the audio domain's fixed first stages are \['mel', 'mel128'\]"
    ):
        latent_domain(AudioDomain(**SMALL), {"autoencoder": "mol"}, load_first_stage)
    with pytest.raises(ValueError, match="domain 'molecule' .* supplies no fixed first stage.*remove the latent"):
        latent_domain(build_domain({"name": "molecule"}), {"autoencoder": "mel"})


def test_bad_latent_inputs_on_the_command_line(tmp_path):
    with pytest.raises(SystemExit) as err:
        main(_args(tmp_path / "run", f"latent.autoencoder={tmp_path / 'missing'}"))
    message = str(err.value)
    assert message.startswith("polydiff: error: ") and "latent.autoencoder=" in message and "mel" in message
    assert "\n" not in message.strip()


def test_the_waveform_classifier_is_reported_beside_the_log_mel_one(tmp_path):
    """domain.wave_metrics adds wave_* figures from a raw-waveform classifier to samples and the reference row, each
    classifier cached in its own file; without it the figures are the log-mel classifier's alone."""
    import numpy as np

    root = tmp_path / "tones"
    for label, freq in (("low", 300.0), ("high", 900.0)):
        (root / label).mkdir(parents=True)
        for i in range(8):
            t = np.arange(2400) / 8000
            sf.write(root / label / f"{i}.wav", (0.5 * np.sin(2 * np.pi * freq * (1 + 0.02 * i) * t)), 8000)
    rows = {}
    for wave in (False, True):
        domain = AudioDomain(
            dataset="folder", root=str(root), sample_rate=8000, duration=0.3, test_fraction=0.3,
            classifier_epochs=1, wave_metrics=wave,
        )  # fmt: skip
        domain.setup(domain.dataset("train"))
        test = domain.dataset("test")
        batch = Batch(test.waves, DenseSpace(tuple(test.waves.shape)), {"label": test.labels})
        rows[wave] = (domain.evaluate(batch), domain.reference_metrics(10))
    plain, both = rows[False], rows[True]
    for without, with_wave in zip(plain, both):
        assert {k: v for k, v in with_wave.items() if not k.startswith("wave_")} == without
        assert {"wave_fid", "wave_is", "wave_label_acc"} <= set(with_wave)
    names = sorted(p.name.split("_")[0] for p in (tmp_path / "cache" / "audio").glob("*.pt"))
    assert names == ["digit", "wave"]


def test_first_stages_side_by_side(tmp_path):
    """benchmarks/bench_first_stage.py: each stage's row on the same held-out clips, its latent size, the target."""
    from benchmarks.bench_first_stage import main as bench
    from benchmarks.bench_first_stage import meets

    result = bench(["--stages", "mel", "mel128", "--n", "6", "--set", "duration=0.3", "limit=20", "metrics=false"]
                   + ["--json", str(tmp_path / "r.json")])  # fmt: skip
    assert json.loads((tmp_path / "r.json").read_text())["stages"].keys() == {"mel", "mel128"}
    mel, wide = result["stages"]["mel"], result["stages"]["mel128"]
    assert (mel["latent_values"], wide["latent_values"], mel["data_values"]) == (64 * 19, 128 * 19, 4800)
    assert mel["num_samples"] == wide["num_samples"] == 6 and wide["si_sdr"] > mel["si_sdr"]
    assert mel["meets_target"] is None  # no classifier metrics: nothing to judge
    real = {"label_acc": 0.99, "is": 9.5, "wave_label_acc": 0.97, "wave_is": 6.9}
    assert meets({"label_acc": 0.99, "is": 9.4, "wave_label_acc": 0.97, "wave_is": 6.22}, real)
    assert not meets({"label_acc": 0.99, "is": 9.4, "wave_label_acc": 0.97, "wave_is": 6.2}, real)  # 0.899x
    assert not meets({"label_acc": 0.94, "is": 9.4, "wave_label_acc": 0.97, "wave_is": 6.5}, real)
