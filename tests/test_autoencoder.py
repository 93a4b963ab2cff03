"""A learned first stage (``objective.name=autoencoder``): the template's posterior, KL and padding, the audio
autoencoder's shapes, training by the trainer, latent diffusion through ``latent.autoencoder=RUN`` end to end, and
the bad inputs of both."""

import json
from pathlib import Path

import pytest
import soundfile as sf
import torch

from domains.audio.autoencoder import MEL_CENTRE, MEL_SCALE, WaveAutoencoder
from domains.audio.distances import mrstft_distance
from domains.audio.domain import AudioDomain
from polydiff.build import Parts, build_domain, load_first_stage
from polydiff.checkpoint import atomic_save
from polydiff.cli import main
from polydiff.first_stage import gaussian_kl
from polydiff.latent import LatentDomain
from polydiff.objectives import build_objective_from

ROOT = Path(__file__).resolve().parents[1]
AE_RECIPE = ROOT / "recipes" / "audio_autoencoder.yaml"
LATENT_RECIPE = ROOT / "recipes" / "audio_latent.yaml"
DATA = ["domain.duration=0.3", "+domain.limit=20", "+domain.metrics=false", "domain.wave_metrics=false"]
SMALL = dict(sample_rate=16000, duration=0.3, limit=20, metrics=False)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("POLYDIFF_CACHE", str(tmp_path / "cache"))


def _ae_args(run: Path, *extra: str, mel: bool = True) -> list[str]:
    """The CPU profile's mel VAE, tiny: 0.3 s clips are 19 log-mel frames, 10 latent frames of 4 channels."""
    net = ["model.channels=8", "model.strides=[2]", "model.latent_channels=4"]
    net += ["+model.griffin_lim_iters=4"] if mel else []
    steps = ["trainer.max_steps=3", "trainer.batch_size=4", "trainer.num_samples=4", "trainer.progress=false"]
    return ["train", str(AE_RECIPE), "profile=cpu", *DATA, *net, *steps, f"hydra.run.dir={run}", *extra]


def _latent_args(run: Path, ae: Path, *extra: str) -> list[str]:
    net = ["model.channels=8", "model.channel_mults=[1,2]", "model.down_factors=[2]"]
    steps = ["trainer.max_steps=2", "trainer.batch_size=4", "trainer.num_samples=2", "trainer.progress=false"]
    return [
        "train", str(LATENT_RECIPE), "profile=cpu", *DATA, *net, *steps, "sampler.steps=2",
        f"latent.autoencoder={ae}", f"hydra.run.dir={run}", *extra,
    ]  # fmt: skip


def test_the_posterior_kl_and_padding_of_the_template():
    torch.manual_seed(0)
    mean, logvar = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    exact = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean, (0.5 * logvar).exp()), torch.distributions.Normal(0.0, 1.0)
    )
    assert torch.allclose(gaussian_kl(mean, logvar), exact.flatten(1).sum(1), atol=1e-5)

    net = WaveAutoencoder(channels=4, channel_mults=[1, 2], strides=[2, 4], latent_channels=3)
    x = 0.1 * torch.randn(2, 1, 1001)  # not a multiple of 8: padded to 1008, cropped back
    mean, logvar = net.posterior(x)
    assert mean.shape == logvar.shape == (2, 3, 126)
    out = net(x, generator=torch.Generator().manual_seed(1))
    assert out["f_hat"].shape == x.shape and out["reconstruction"].shape == out["kl"].shape == (2,)
    expected_kl = gaussian_kl(mean, logvar) / 1001  # nats per data value
    assert torch.allclose(out["kl"], expected_kl, rtol=1e-5)
    again = net(x, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out["f_hat"], again["f_hat"])  # the posterior sample follows the generator
    assert net.reconstruct(x).shape == x.shape and torch.equal(net.encode(x), mean)

    plain = WaveAutoencoder(channels=4, channel_mults=[1, 2], strides=[2, 4], latent_channels=3, variational=False)
    assert plain.posterior(x)[1] is None and torch.equal(plain(x)["kl"], torch.zeros(2))
    loss = plain(x)["reconstruction"].sum()
    loss.backward()
    assert all(p.grad is not None for p in plain.parameters())  # every weight trains (DDP needs no unused ones)


def test_the_audio_stage_shapes_and_its_loss():
    """16,000 samples through strides 4 x 4 x 4 are 250 frames; the loss is L1 plus the STFT distance and is zero
    only for a perfect reconstruction."""
    net = WaveAutoencoder(channels=4, channel_mults=[1, 2, 4], strides=[4, 4, 4], latent_channels=16)
    x = 0.1 * torch.randn(1, 1, 16000)
    assert net.encode(x).shape == (1, 16, 250) and net.decode(net.encode(x)).shape == x.shape
    assert net.reconstruction(x, x).item() == pytest.approx(0.0, abs=1e-6)
    y = x + 0.01 * torch.randn_like(x)
    assert net.reconstruction(x, y).item() == pytest.approx(
        (x - y).abs().mean().item() + mrstft_distance(x, y, net.ffts).item(), rel=1e-5
    )
    silent = torch.zeros(1, 1, 4096)
    assert mrstft_distance(silent, 0.5 * torch.randn(1, 1, 4096), net.ffts).item() < 20  # a silent window: bounded
    with pytest.raises(ValueError, match="model.strides: 3 must be an even number"):
        WaveAutoencoder(strides=[3], channel_mults=[1])
    with pytest.raises(ValueError, match="model.channel_mults .* one entry per model.strides"):
        WaveAutoencoder(strides=[2, 2], channel_mults=[1])


def test_the_mel_vae_encodes_log_mels_and_renders_waves():
    """model.front=mel: the mel stage's log-mels (scaled) are the features, decoded ones are rendered by its
    Griffin-Lim to the clip's length; the mel settings are part of the stage's identity (its version)."""
    audio = AudioDomain(**SMALL)
    net = audio.autoencoder_network(front="mel", channels=8, strides=[2], latent_channels=3, griffin_lim_iters=4)
    x = 0.1 * torch.randn(2, 1, 4800)
    f = net.features(x)
    assert f.shape == (2, 64, 19) and torch.allclose(f, (net.mel.encode(x) - MEL_CENTRE) / MEL_SCALE)
    assert net.encode(x).shape == (2, 3, 10)
    out = net(x)
    assert out["f_hat"].shape == f.shape and out["reconstruction"].shape == (2,)
    assert out["reconstruction"].allclose((f - out["f_hat"]).abs().flatten(1).mean(1))
    y = net.reconstruct(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    other = audio.autoencoder_network(front="mel", channels=8, strides=[2], latent_channels=3, n_mels=32)
    assert net.version != other.version and net.version == net.mel.identity
    with pytest.raises(ValueError, match=r"model.front='fft': choose one of \['mel', 'wave'\]"):
        audio.autoencoder_network(front="fft")


def test_a_waveform_autoencoder_trains_on_windows(tmp_path):
    """model.front=wave with objective.crop: the trainer's steps run on random windows, its row on whole clips."""
    run = tmp_path / "wave"
    main(_ae_args(run, "model.front=wave", "model.dilations=[1]", "objective.crop=1024", mel=False))
    row = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in r][-1]
    assert row["latent_std"] > 0 and "si_sdr" in row
    net = Parts.from_config(torch.load(run / "checkpoints" / "last.pt", weights_only=True)["config"]).net
    assert net.encode(torch.zeros(1, 1, 4800)).shape == (1, 4, 2400)  # strides [2]: 4800 / 2


def test_train_an_autoencoder_then_diffuse_its_latents(tmp_path, capsys, monkeypatch):
    ae, ldm = tmp_path / "ae", tmp_path / "ldm"
    main(_ae_args(ae))
    records = [json.loads(line) for line in (ae / "metrics.jsonl").read_text().splitlines()]
    row = [r for r in records if r["kind"] == "eval"][-1]
    assert {"si_sdr", "mrstft", "latent_mean", "latent_std"} <= set(row) and row["latent_std"] > 0
    assert not (ae / "samples").exists() or not list((ae / "samples").iterdir())  # a first stage draws no samples

    main(_latent_args(ldm, ae))
    parts = Parts.from_config(torch.load(ldm / "checkpoints" / "last.pt", weights_only=True)["config"])
    assert isinstance(parts.domain, LatentDomain) and parts.domain.sample_shape == (4, 10)  # 19 mel frames / 2
    assert len(list((ldm / "samples").glob("step_0000002_*.wav"))) == 2
    out = tmp_path / "drawn"
    main(["sample", str(ldm), "--n", "2", "--out", str(out), "--eval", "sampler.steps=2", "label=seven"])
    wavs = sorted(out.glob("*.wav"))
    assert len(wavs) == 2 and sf.read(wavs[0])[0].shape == (4800,)  # decoded to the data's length
    record = json.loads((out / "sampling.json").read_text())
    assert set(record["reconstruction"]) == {"si_sdr", "mrstft", "num_samples"}
    assert "first stage" in capsys.readouterr().out
    cached = sorted((tmp_path / "cache" / "latent").glob("*_train_*.pt"))
    assert len(cached) == 1

    # The autoencoder trained further is another first stage: its latents are encoded again, never mixed, and the
    # latent model trained on the old ones is refused by name.
    main(_ae_args(ae, "trainer.max_steps=4"))
    with pytest.raises(SystemExit, match=r"latent.autoencoder=.*has changed since this model was trained"):
        main(["sample", str(ldm), "--n", "2", "--out", str(tmp_path / "again"), "sampler.steps=2"])
    # Given as a relative path, the autoencoder is saved absolute: the run samples from any working folder.
    monkeypatch.chdir(tmp_path)
    main(_latent_args(tmp_path / "ldm2", Path("ae")))
    saved = torch.load(tmp_path / "ldm2" / "checkpoints" / "last.pt", weights_only=True)["config"]
    assert saved["latent"]["autoencoder"] == str(ae.resolve())
    assert len(sorted((tmp_path / "cache" / "latent").glob("*_train_*.pt"))) == 2
    monkeypatch.chdir(ae)
    main(["sample", str(tmp_path / "ldm2"), "--n", "1", "--out", str(tmp_path / "elsewhere"), "sampler.steps=2"])
    assert len(list((tmp_path / "elsewhere").glob("*.wav"))) == 1

    # An autoencoder run is not a generative model.
    with pytest.raises(SystemExit, match="autoencoder run .* draws no samples"):
        main(["sample", str(ae), "--n", "2", "--out", str(tmp_path / "nope")])
    with pytest.raises(SystemExit, match="--nll is not defined for an autoencoder run"):
        main(["eval", str(ae), "--nll"])

    _bad_first_stages(tmp_path, ae, ldm)


def _bad_first_stages(tmp_path: Path, ae: Path, ldm: Path) -> None:
    """A missing, empty, unfinished, non-autoencoder or ill-fitting run: each refused naming the fix."""
    audio = AudioDomain(**SMALL)
    with pytest.raises(FileNotFoundError, match="no such run folder; train one first"):
        load_first_stage(str(tmp_path / "missing"), audio)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has saved no checkpoint yet"):
        load_first_stage(str(tmp_path / "empty"), audio)
    with pytest.raises(ValueError, match="is a run of objective 'vp', not an autoencoder"):
        load_first_stage(str(ldm), audio)
    ckpt = torch.load(ae / "checkpoints" / "last.pt", weights_only=True)
    ckpt["config"]["trainer"]["max_steps"] = 10
    atomic_save(ckpt, tmp_path / "unfinished.pt")
    with pytest.raises(ValueError, match=r"is unfinished \(step 4 of its trainer.max_steps=10\)"):
        load_first_stage(str(tmp_path / "unfinished.pt"), audio)
    with pytest.raises(ValueError, match="trained with domain.sample_rate=16000, this recipe has domain.sample_rate"):
        load_first_stage(str(ae), AudioDomain(**{**SMALL, "sample_rate": 8000}))
    with pytest.raises(ValueError, match="trained with domain.channels=1, this recipe has domain.channels=2"):
        load_first_stage(str(ae), AudioDomain(**{**SMALL, "channels": 2}))

    class OtherAudio(AudioDomain):
        pass

    with pytest.raises(ValueError, match="was trained on domain 'audio' .* train an autoencoder on this domain"):
        load_first_stage(str(ae), OtherAudio(**SMALL))
    with pytest.raises(SystemExit, match="trained with domain.sample_rate=16000"):
        main(_latent_args(tmp_path / "ldm3", ae, "domain.sample_rate=8000"))


def test_bad_autoencoder_recipes(tmp_path):
    for options, message in (
        ({"kind": "vq"}, r"objective.kind='vq': choose one of \['kl', 'plain'\]"),
        ({"kl_weight": -1.0}, "objective.kl_weight=-1.0 must be a finite number >= 0"),
        ({"kl_weight": float("nan")}, "objective.kl_weight=nan must be a finite number"),
        ({"crop": -2}, "objective.crop=-2 must be >= 0"),
    ):
        with pytest.raises(ValueError, match=message):
            build_objective_from({"name": "autoencoder", **options})
    objective = build_objective_from({"name": "autoencoder"})
    with pytest.raises(ValueError, match="domain 'image' supplies no trainable first stage"):
        objective.network_builder(build_domain({"name": "image"}))
    with pytest.raises(SystemExit, match="model.in_channels is set from the data"):
        main(_ae_args(tmp_path / "a", "+model.in_channels=2"))
    with pytest.raises(SystemExit, match="trains a first stage on the data: remove the recipe's latent section"):
        main(_ae_args(tmp_path / "b", "latent.autoencoder=mel"))
