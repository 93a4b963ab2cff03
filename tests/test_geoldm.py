"""GeoLDM for molecules (Xu et al. 2023): the equivariant first stage's symmetries, the ragged latent domain's
normalisation, training both stages and sampling through the command line, and the bad inputs."""

from pathlib import Path

import numpy as np
import pytest
import torch

from domains.molecule.data import read_sample_molecules
from domains.molecule.domain import MoleculeDomain
from polydiff import Batch, Domain, RaggedSpace
from polydiff.autoencoder import AutoencoderObjective, LearnedAutoencoder
from polydiff.build import build_domain, load_first_stage
from polydiff.cli import main
from polydiff.latent import RaggedLatentDomain, latent_domain

ROOT = Path(__file__).resolve().parents[1]
TINY_DATA = ["domain.max_molecules=20", "domain.num_conformers=2", "domain.property_epochs=0"]
STEPS = ["trainer.batch_size=4", "trainer.num_samples=4", "trainer.progress=false"]


def _orthogonal(gen: torch.Generator) -> torch.Tensor:
    """A random rotation followed by a reflection ``[3, 3]`` (float64)."""
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=gen, dtype=torch.float64))
    return q @ torch.diag(torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64))


def _molecules(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, MoleculeDomain]:
    """Two molecules (6 and 4 atoms) as data rows ``[10, 3 + F]`` (float64, not centred) and their batch index."""
    dom = MoleculeDomain()
    z = torch.tensor([6, 1, 1, 1, 8, 1, 7, 1, 1, 1])
    x = torch.cat([torch.randn(10, 3, generator=gen, dtype=torch.float64), dom.features(z).double()], dim=1)
    return x, torch.tensor([0] * 6 + [1] * 4), dom


def _stage(dom: MoleculeDomain, variational: bool = True, **model):
    torch.manual_seed(0)
    sizes = dict(hidden=16, encoder_layers=2, decoder_layers=2, latent_features=2)
    return dom.autoencoder_network(variational, **{**sizes, **model}).double()


def test_the_encoder_and_decoder_are_e3_and_permutation_equivariant():
    gen = torch.Generator().manual_seed(0)
    x, batch, dom = _molecules(gen)
    stage = _stage(dom)
    q, shift = _orthogonal(gen), torch.randn(1, 3, generator=gen, dtype=torch.float64)
    moved = torch.cat([x[:, :3] @ q.T + shift, x[:, 3:]], dim=1)
    (mean, logvar), (mean2, logvar2) = stage.posterior(x, batch), stage.posterior(moved, batch)
    assert mean.shape == (10, 5) and logvar.shape == (10, 2)
    torch.testing.assert_close(mean2[:, :3], mean[:, :3] @ q.T, rtol=0, atol=1e-12)  # coordinates rotate, no shift
    torch.testing.assert_close(mean2[:, 3:], mean[:, 3:], rtol=0, atol=1e-12)  # invariant features
    torch.testing.assert_close(logvar2, logvar, rtol=0, atol=1e-12)
    com = torch.zeros(2, 3, dtype=torch.float64).index_add_(0, batch, mean[:, :3])
    assert com.abs().max() < 1e-12  # zero centre of mass
    out, out2 = stage.decoder(mean, batch), stage.decoder(mean2, batch)  # [N, 3 + T]
    torch.testing.assert_close(out2[:, :3], out[:, :3] @ q.T, rtol=0, atol=1e-12)  # positions
    torch.testing.assert_close(out2[:, 3:], out[:, 3:], rtol=0, atol=1e-12)  # type logits
    perm = torch.randperm(10, generator=gen)  # atoms shuffled, across molecules too
    torch.testing.assert_close(stage.posterior(x[perm], batch[perm])[0], mean[perm], rtol=0, atol=1e-12)
    torch.testing.assert_close(stage.decoder(mean[perm], batch[perm]), out[perm], rtol=0, atol=1e-12)


def test_training_pass_kl_and_decoded_rows():
    """The loss is per molecule; the KL covers the invariant part, in nats per data value; a plain stage has none;
    decoded rows are data rows (argmax types, their one-hot and atomic number in EDM's scaling)."""
    gen = torch.Generator().manual_seed(1)
    x, batch, dom = _molecules(gen)
    stage = _stage(dom, coordinate_noise=0.1)
    out = stage(x, generator=torch.Generator().manual_seed(0), batch=batch)
    assert out["reconstruction"].shape == out["kl"].shape == (2,) and (out["kl"] > 0).all()
    mean, logvar = stage.posterior(x, batch)
    rows = 0.5 * (mean[:, 3:].square() + logvar.exp() - 1 - logvar).sum(1)  # [N]
    torch.testing.assert_close(out["kl"].double(), torch.stack([rows[:6].sum() / 54, rows[6:].sum() / 36]))
    assert torch.equal(_stage(dom, variational=False)(x, batch=batch)["kl"], torch.zeros(2, dtype=torch.float64))
    decoded = stage.reconstruct(x, batch)  # [N, 3 + F]
    assert decoded.shape == x.shape
    types = decoded[:, 3:8].argmax(1)
    torch.testing.assert_close(decoded[:, 3:], dom.features(torch.tensor([1, 6, 7, 8, 9])[types]).double())
    with pytest.raises(KeyError, match="model.atomic_numbers is set from the data"):
        dom.autoencoder_network(True, atomic_numbers=[1])


def test_the_ragged_latent_keeps_zero_com_and_equivariance(tmp_path, monkeypatch):
    """Training molecules encoded once (cached), coordinates scaled by one number and not shifted, features by a
    shift and scale each; the normalised encoding is equivariant and the prior draws zero-CoM latent rows."""
    monkeypatch.setenv("POLYDIFF_CACHE", str(tmp_path))
    inner = MoleculeDomain(max_molecules=20, num_conformers=2, property_epochs=0)
    latent = RaggedLatentDomain(inner, LearnedAutoencoder(_stage(inner).float(), "tiny", inner), "tiny")
    data = latent.dataset("train")
    latent.setup(data)
    assert latent.sample_shape == (5,) and len(list((tmp_path / "latent").glob("*_train_*.pt"))) == 1
    assert torch.equal(latent.shift[:3], torch.zeros(3)) and len(set(latent.scale[:3].tolist())) == 1
    torch.testing.assert_close(data.z[:, 3:].mean(0), torch.zeros(2), rtol=0, atol=1e-5)
    batch = latent.collate([data[i] for i in range(4)])
    assert isinstance(batch.space, RaggedSpace) and batch.space.centered == (0, 1, 2) and batch.x.shape[1] == 5
    com = batch.space.segment_sum(batch.x[:, :3])
    assert com.abs().max() < 1e-4
    rows = inner.collate([inner.dataset("train")[i] for i in range(4)])
    q = _orthogonal(torch.Generator().manual_seed(2)).float()
    moved = torch.cat([rows.x[:, :3] @ q.T + 1.5, rows.x[:, 3:]], dim=1)
    z, z2 = latent.encode(rows.x, rows.space.batch), latent.encode(moved, rows.space.batch)
    torch.testing.assert_close(z2[:, :3], z[:, :3] @ q.T, rtol=0, atol=1e-4)
    torch.testing.assert_close(z2[:, 3:], z[:, 3:], rtol=0, atol=1e-4)
    space, cond = latent.prior(3, num_atoms=[4, 5, 6], generator=torch.Generator().manual_seed(0))
    noise = space.randn(torch.Generator().manual_seed(0))
    assert noise.shape == (15, 5) and space.segment_sum(noise[:, :3]).abs().max() < 1e-5 and "batch" in cond


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A molecule autoencoder (3 steps), a latent diffusion run on it (2 steps) and 4 samples, all tiny."""
    root = tmp_path_factory.mktemp("geoldm")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("POLYDIFF_CACHE", str(root / "cache"))
        ae, ldm = root / "ae", root / "ldm"
        net = ["model.hidden=16", "model.decoder_layers=1", "trainer.max_steps=3"]
        main(["train", str(ROOT / "recipes" / "molecule_autoencoder.yaml"), "profile=cpu", *TINY_DATA, *net, *STEPS,
              f"hydra.run.dir={ae}"])  # fmt: skip
        net = ["model.hidden=16", "model.layers=1", "trainer.max_steps=2", "sampler.steps=2"]
        main(["train", str(ROOT / "recipes" / "molecule_latent.yaml"), "profile=cpu", *TINY_DATA, *net, *STEPS,
              f"latent.autoencoder={ae}", f"hydra.run.dir={ldm}"])  # fmt: skip
        main(["sample", str(ldm), "--n", "4", "--out", str(root / "drawn"), "sampler.steps=2"])
        yield {"ae": ae, "ldm": ldm, "drawn": root / "drawn", "cache": root / "cache"}


def test_train_both_stages_and_sample_decoded_molecules(runs):
    state = torch.load(runs["ldm"] / "checkpoints" / "last.pt", weights_only=True)["domain_state"]["latent"]
    assert state["shape"] == [4] and state["shift"][:3] == [0.0, 0.0, 0.0] and len(set(state["scale"][:3])) == 1
    assert len(list((runs["cache"] / "latent").glob("*_train_*.pt"))) == 1
    molecules = read_sample_molecules(runs["drawn"] / "samples.sdf")
    assert len(molecules) == 4
    for symbols, pos, _, _ in molecules:
        assert set(symbols) <= {"H", "C", "N", "O", "F"} and len(symbols) == len(pos) >= 1
        assert np.isfinite(pos).all() and np.abs(pos.mean(0)).max() < 1e-3  # zero centre of mass (4 decimals)


def test_a_first_stage_of_another_domain_is_refused(runs, tmp_path, monkeypatch):
    monkeypatch.setenv("POLYDIFF_CACHE", str(tmp_path / "cache"))
    audio = tmp_path / "audio_ae"
    main(["train", str(ROOT / "recipes" / "audio_autoencoder.yaml"), "profile=cpu", "domain.duration=0.3",
          "+domain.limit=20", "+domain.metrics=false", "domain.wave_metrics=false", "model.channels=8",
          "model.strides=[2]", "model.latent_channels=4", "+model.griffin_lim_iters=4", "trainer.max_steps=1",
          *STEPS, f"hydra.run.dir={audio}"])  # fmt: skip
    mismatch = r"was trained on domain 'audio' \(AudioDomain\), this recipe's is 'molecule' \(MoleculeDomain\)"
    with pytest.raises(ValueError, match=mismatch):
        latent_domain(MoleculeDomain(), {"autoencoder": str(audio)}, load_first_stage)
    with pytest.raises(ValueError, match=r"trained on domain 'molecule' .*this recipe's is 'audio'"):
        latent_domain(build_domain({"name": "audio"}), {"autoencoder": str(runs["ae"])}, load_first_stage)


class _Cloud(Domain):
    """A ragged domain with no first stage of its own: point clouds of 3 points."""

    def dataset(self, split):
        return [torch.randn(3, 2) for _ in range(4)]

    def collate(self, items):
        batch = torch.repeat_interleave(torch.arange(len(items)), 3)
        return Batch(torch.cat(items), RaggedSpace(batch, len(items), 2), {"batch": batch})

    def autoencoder(self, spec):
        return type("Identity", (), {"identity": "id", "encode": lambda self, x: x, "decode": lambda self, z: z})()


def test_a_ragged_domain_without_a_ragged_first_stage_is_refused():
    with pytest.raises(ValueError, match="domain 'molecule' .* supplies no fixed first stage.*trained on it"):
        latent_domain(build_domain({"name": "molecule"}), {"autoencoder": "mel"})
    with pytest.raises(ValueError, match="objective.name=autoencoder: domain '_Cloud' supplies no trainable first"):
        AutoencoderObjective().network_builder(_Cloud())
    cloud = latent_domain(_Cloud(), {"autoencoder": "identity"})
    with pytest.raises(ValueError, match="a dense first stage needs a dense domain.*collates a RaggedSpace.*ragged"):
        cloud.dataset("train")
