"""Molecule domain: EGNN equivariance, zero-CoM states, EDM metrics, loaders and bad input."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils._pytree import tree_leaves

from domains.molecule import EGNN, MoleculeDomain
from domains.molecule.bonds import bond_order
from domains.molecule.data import read_sdf, read_smiles_file
from domains.molecule.egnn import fully_connected_edges
from domains.molecule.metrics import molecule_metrics, stability
from domains.molecule.qm9 import _local_qm9, load_qm9
from polydiff import Batch, RaggedSpace
from polydiff.generate import generate
from polydiff.objectives import Objective
from polydiff.samplers import sample
from polydiff.schedules import make_schedule

torch.set_num_threads(1)
F = 6  # H, C, N, O, F one-hot + atomic number


def _random_orthogonal(reflect: bool, gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=gen, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    if (torch.det(q) < 0) != reflect:
        q[:, 0] = -q[:, 0]
    return q  # [3, 3], det = -1 when reflect


def _ragged(sizes, gen, dtype=torch.float64):
    batch = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    space = RaggedSpace(batch, len(sizes), 3 + F, centered=(0, 1, 2))
    x = space.randn(generator=gen, dtype=dtype)
    return x, batch, space


def _embedded(smiles: str, seed: int = 0):
    from rdkit import Chem
    from rdkit.Chem import AllChem

    mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
    AllChem.EmbedMolecule(mol, randomSeed=seed)
    AllChem.MMFFOptimizeMolecule(mol)
    return mol


def _symbols_pos(mol):
    return [a.GetSymbol() for a in mol.GetAtoms()], mol.GetConformer().GetPositions()


# ----------------------------------------------------------------- network
@pytest.mark.parametrize("reflect", [False, True])
@pytest.mark.parametrize("context_dim", [0, 1])
def test_egnn_is_e3_and_permutation_equivariant(reflect, context_dim):
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net = EGNN(F, hidden=32, layers=3, context_dim=context_dim).double().eval()
    x, batch, _ = _ragged([5, 9, 3], gen)
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    ctx = {"context": torch.tensor([[0.3], [float("nan")], [-1.0]], dtype=torch.float64)} if context_dim else {}
    out = net(x, t, batch, **ctx)
    q = _random_orthogonal(reflect, gen)
    shift = torch.randn(3, generator=gen, dtype=torch.float64) * 5
    x_rot = torch.cat([x[:, :3] @ q.T + shift, x[:, 3:]], dim=1)
    out_rot = net(x_rot, t, batch, **ctx)
    # eps for positions rotates with the input and ignores translations; feature eps is invariant.
    torch.testing.assert_close(out_rot[:, :3], out[:, :3] @ q.T, rtol=0, atol=1e-10)
    torch.testing.assert_close(out_rot[:, 3:], out[:, 3:], rtol=0, atol=1e-10)
    perm = torch.randperm(x.shape[0], generator=gen)
    out_perm = net(x[perm], t, batch[perm], **ctx)
    torch.testing.assert_close(out_perm, out[perm], rtol=0, atol=1e-10)
    # the predicted position noise has zero centre of mass per molecule
    com = torch.zeros(3, 3, dtype=torch.float64).index_add_(0, batch, out[:, :3])
    assert com.abs().max() < 1e-10


def test_egnn_coordinate_update_uses_the_full_coords_range_in_every_block():
    """EDM's egnn_new.EGNN hands coords_range (15), not coords_range / n_layers, to each block."""
    layers, d0 = 3, 1.0
    net = EGNN(F, hidden=8, layers=layers, coords_range=15.0).double().eval()
    with torch.no_grad():  # saturate tanh(phi_x) at +1 on every edge: each block moves by 15 (x_i - x_j) / (d + 1)
        for block in net.blocks:
            for p in block.coord_mlp.parameters():
                p.zero_()
            block.coord_mlp.out.bias.fill_(10.0)
            block.coord_out.weight.fill_(1.0)
    x = torch.zeros(2, 3 + F, dtype=torch.float64)
    x[0, 0], x[1, 0] = -d0 / 2, d0 / 2
    out = net(x, torch.tensor([0.5], dtype=torch.float64), torch.zeros(2, dtype=torch.long))
    d = d0
    for _ in range(layers):
        d = d + 2 * 15.0 * d / (d + 1)  # both atoms move apart
    torch.testing.assert_close(out[1, 0], torch.tensor((d - d0) / 2, dtype=torch.float64))
    assert all(block.coords_range == 15.0 for block in net.blocks)


def test_egnn_float32_equivariance_and_unsorted_batch():
    gen = torch.Generator().manual_seed(1)
    net = EGNN(F, hidden=32, layers=2).eval()
    x, batch, _ = _ragged([4, 7], gen, torch.float32)
    t = torch.tensor([0.2, 0.7])
    q = _random_orthogonal(True, gen).float()
    out = net(x, t, batch)
    out_rot = net(torch.cat([x[:, :3] @ q.T, x[:, 3:]], 1), t, batch)
    torch.testing.assert_close(out_rot[:, :3], out[:, :3] @ q.T, rtol=1e-4, atol=1e-5)
    row, col = fully_connected_edges(torch.tensor([1, 0, 1, 0, 1]))
    assert sorted(zip(row.tolist(), col.tolist())) == [(0, 2), (0, 4), (1, 3), (2, 0), (2, 4), (3, 1), (4, 0), (4, 2)]


def test_edge_list_reads_the_device_once_and_keeps_its_order():
    """One host read (the edge count): no bincount, no boolean mask, repeat_interleave told its size."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.calls.append((str(func), args, kwargs or {}))
            return func(*args, **(kwargs or {}))

    batch = torch.tensor([1, 0, 1, 0, 1, 3, 3, 1])  # sample 2 is empty
    with Ops() as ops:
        row, col = fully_connected_edges(batch, 4)
    names = [name for name, _, _ in ops.calls]
    assert names.count("aten._local_scalar_dense.default") == 1 and "aten.bincount.default" not in names
    assert all(kw.get("output_size") is not None for name, _, kw in ops.calls if "repeat_interleave" in name)
    assert not any(
        isinstance(a, torch.Tensor) and a.dtype == torch.bool
        for name, args, _ in ops.calls
        if name.startswith("aten.index")
        for a in tree_leaves(args)
    )
    # Row-major over the rows sorted by sample, partners in ascending sorted order: the order of the masked n^2 list.
    order = torch.argsort(batch, stable=True).tolist()
    expected = [(i, j) for i in order for j in order if i != j and batch[i] == batch[j]]
    assert list(zip(row.tolist(), col.tolist())) == expected
    assert all(torch.equal(a, b) for a, b in zip(fully_connected_edges(batch), (row, col)))


def test_null_context_is_learned_token_and_differs_from_a_value():
    gen = torch.Generator().manual_seed(2)
    net = EGNN(F, hidden=16, layers=2, context_dim=1).eval()
    with torch.no_grad():
        net.null_context.fill_(0.7)
    x, batch, _ = _ragged([4, 5], gen, torch.float32)
    t = torch.tensor([0.3, 0.3])
    null = net(x, t, batch, context=torch.full((2, 1), float("nan")))
    torch.testing.assert_close(null, net(x, t, batch, context=None))
    assert not torch.allclose(null, net(x, t, batch, context=torch.tensor([[0.7], [0.7]])))
    with pytest.raises(ValueError, match="context_dim=1"):
        net(x, t, batch, context=torch.zeros(2, 3))


def test_sampler_step_is_equivariant():
    gen = torch.Generator().manual_seed(3)
    net = EGNN(F, hidden=32, layers=2).double().eval()
    schedule = make_schedule("polynomial", steps=1000, power=2)
    objective = Objective(prediction="eps")
    x, batch, space = _ragged([6, 4], gen)
    q = _random_orthogonal(True, gen)
    perm = torch.randperm(x.shape[0], generator=gen)
    cond = {"batch": batch}
    with torch.no_grad():
        out = sample("ddim", objective.denoiser(net, schedule, space, cond), x, schedule, 1, space=space)
        rot = torch.cat([x[:, :3] @ q.T, x[:, 3:]], 1)
        out_rot = sample("ddim", objective.denoiser(net, schedule, space, cond), rot, schedule, 1, space=space)
        pspace = RaggedSpace(batch[perm], 2, 3 + F, centered=(0, 1, 2))
        out_perm = sample(
            "ddim",
            objective.denoiser(net, schedule, pspace, {"batch": batch[perm]}),
            x[perm],
            schedule,
            1,
            space=pspace,
        )
    assert not torch.allclose(out, x)
    torch.testing.assert_close(out_rot[:, :3], out[:, :3] @ q.T, rtol=0, atol=1e-9)
    torch.testing.assert_close(out_rot[:, 3:], out[:, 3:], rtol=0, atol=1e-9)
    torch.testing.assert_close(out_perm, out[perm], rtol=0, atol=1e-9)
    com = torch.zeros(2, 3, dtype=torch.float64).index_add_(0, batch, out[:, :3])
    assert com.abs().max() < 1e-10


# ----------------------------------------------------------- state / prior
def test_zero_com_noise_projection_and_prior(tmp_path, caplog):
    dom = MoleculeDomain(
        source="sdf",
        path=str(_write_sdf(tmp_path / "m.sdf", ["CCO", "c1ccccc1", "CC#N", "OCC=O"])),
        split=(1.0, 0.0, 0.0),
    )
    dom.setup(dom.dataset("train"))
    assert dom.num_atoms_hist[9] == 1 and dom.num_atoms_hist[12] == 1 and sum(dom.num_atoms_hist) == 4
    space, cond = dom.prior(6, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(cond["batch"], minlength=6)
    assert set(counts.tolist()) <= {6, 8, 9, 12}
    noise = space.randn(generator=torch.Generator().manual_seed(1))
    com = torch.zeros(6, 3).index_add_(0, cond["batch"], noise[:, :3])
    assert com.abs().max() < 1e-5
    feat_mean = torch.zeros(6, F).index_add_(0, cond["batch"], noise[:, 3:]).abs().max()
    assert feat_mean > 0.1  # features are not centred
    shifted = noise + torch.tensor([1.0, -2.0, 3.0] + [0.5] * F)
    proj = space.project(shifted)
    torch.testing.assert_close(proj[:, :3], noise[:, :3], atol=1e-5, rtol=0)
    torch.testing.assert_close(proj[:, 3:], shifted[:, 3:])
    space2, cond2 = dom.prior(3, num_atoms=[4, 5, 12])
    assert torch.bincount(cond2["batch"]).tolist() == [4, 5, 12] and space2.shape == (21, 3 + F)
    for bad in ([3], 7.9, 0, True):  # never truncated to an int nor read as one
        with pytest.raises(ValueError, match="prior.num_atoms must be a positive int"):
            dom.prior(2, num_atoms=bad)
    with caplog.at_level(logging.WARNING):
        dom.prior(1, num_atoms=40)  # more than twice the 12-atom largest training molecule
    assert "prior.num_atoms=40 is over twice the largest training molecule (12 atoms)" in caplog.text
    # collate: EDM feature scaling, zero CoM; state_dict round trip keeps sampling possible
    batch = dom.collate([dom.dataset("train")[i] for i in range(2)])
    assert batch.x.shape[1] == 3 + F
    onehot = batch.x[:, 3:8]
    assert torch.allclose(onehot.sum(1), torch.full((batch.x.shape[0],), 0.25))
    assert set((batch.x[:, 8] * 10).round().long().tolist()) <= {1, 6, 7, 8}
    fresh = MoleculeDomain(source="sdf", path="unused.sdf")
    fresh.load_state_dict(dom.state_dict())
    assert fresh.num_atoms_hist == dom.num_atoms_hist and fresh.train_smiles() == dom.train_smiles()


# ----------------------------------------------------------------- metrics
def test_edm_bond_table_and_known_molecules():
    assert bond_order("C", "C", 1.53) == 1 and bond_order("C", "C", 1.34) == 2 and bond_order("C", "C", 1.20) == 3
    assert bond_order("C", "H", 1.18) == 1 and bond_order("C", "H", 1.20) == 0
    assert bond_order("C", "O", 1.22) == 2 and bond_order("N", "N", 1.12) == 3
    symbols, pos = _symbols_pos(_embedded("CCO"))
    assert stability(symbols, pos) == (9, 9)
    stretched = pos.copy()
    o = symbols.index("O")
    c = [i for i, s in enumerate(symbols) if s == "C"][1]
    stretched[o] = pos[c] + (pos[o] - pos[c]) * 1.6  # C-O from ~1.42 to ~2.3 Angstrom
    n_stable, n = stability(symbols, stretched)
    assert n_stable < n
    m = molecule_metrics([(symbols, pos), (symbols, pos), (symbols, stretched)], train_smiles={"nothing"})
    assert m["atom_stability"] == pytest.approx((9 + 9 + n_stable) / 27)
    assert m["mol_stability"] == pytest.approx(2 / 3)
    # EDM's validity keeps the largest fragment, so the split molecule still counts; two distinct SMILES of 3.
    assert m["validity"] == 1.0 and m["uniqueness"] == pytest.approx(2 / 3) and m["novelty"] == 1.0
    assert m["validity_rdkit"] == pytest.approx(2 / 3)  # RDKit's bond perception rejects the stretched one
    same = molecule_metrics([(symbols, pos)], train_smiles=None)
    assert same["validity"] == 1.0 and "novelty" not in same


# ----------------------------------------------------------------- loaders
def _write_sdf(path: Path, smiles: list[str], props: dict | None = None) -> Path:
    from rdkit import Chem

    w = Chem.SDWriter(str(path))
    for i, s in enumerate(smiles):
        mol = _embedded(s, seed=i)
        mol.SetProp("_Name", f"mol{i}")
        for k, v in (props or {}).items():
            mol.SetProp(k, str(v[i]))
        w.write(mol)
    w.close()
    return path


def test_sdf_loader_skips_bad_records_by_name(tmp_path, caplog):
    from rdkit import Chem
    from rdkit.Chem import AllChem

    path = tmp_path / "mixed.sdf"
    w = Chem.SDWriter(str(path))
    good = _embedded("CCO")
    good.SetProp("_Name", "ethanol")
    good.SetProp("gap", "6.5")
    w.write(good)
    flat = Chem.AddHs(Chem.MolFromSmiles("CCN"))
    AllChem.Compute2DCoords(flat)
    flat.SetProp("_Name", "flat_amine")
    flat.SetProp("gap", "1")
    w.write(flat)
    noh = Chem.RemoveHs(_embedded("CCC"))
    noh.SetProp("_Name", "no_hydrogens")
    noh.SetProp("gap", "1")
    w.write(noh)
    cl = _embedded("CCl")
    cl.SetProp("_Name", "chloromethane")
    cl.SetProp("gap", "1")
    w.write(cl)
    ion = _embedded("[NH4+]")
    ion.SetProp("_Name", "ammonium")
    ion.SetProp("gap", "1")
    w.write(ion)
    collapsed = _embedded("CO")
    for k in range(collapsed.GetNumAtoms()):
        collapsed.GetConformer().SetAtomPosition(k, (0.0, 0.0, 1e-3 * k))
    collapsed.SetProp("_Name", "collapsed")
    collapsed.SetProp("gap", "1")
    w.write(collapsed)
    w.close()
    with caplog.at_level(logging.WARNING):
        ds = read_sdf(path, ["H", "C", "N", "O", "F"], properties=["gap"])
    assert len(ds) == 1 and ds[0]["z"].tolist() == [6, 6, 8, 1, 1, 1, 1, 1, 1]
    assert float(ds[0]["y"][0]) == pytest.approx(6.5)
    text = caplog.text
    assert "'flat_amine'" in text and "3-D" in text
    assert "'no_hydrogens'" in text and "explicit hydrogens" in text
    assert "'chloromethane'" in text and "['Cl']" in text
    assert "'ammonium'" in text and "charged" in text
    assert "'collapsed'" in text and "closer than 0.5" in text
    assert "5 record(s) skipped" in text
    empty = tmp_path / "empty.sdf"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty.sdf is empty"):
        read_sdf(empty, ["H", "C"])
    with pytest.raises(FileNotFoundError, match="nope.sdf"):
        read_sdf(tmp_path / "nope.sdf", ["H", "C"])


def test_sdf_blank_3d_record_is_skipped_not_read_as_a_zero_atom_molecule(tmp_path, caplog):
    """A 0-atom record flagged 3-D would add 0 to the atom-count prior and a 0/0 (NaN) term to the loss."""
    path = _write_sdf(tmp_path / "blank.sdf", ["CCO"])
    blank = "blank\n     RDKit          3D\n\n  0  0  0  0  0  0  0  0  0  0999 V2000\nM  END\n$$$$\n"
    path.write_text(path.read_text() + blank)
    with caplog.at_level(logging.WARNING):
        ds = read_sdf(path, ["H", "C", "N", "O", "F"])
    assert len(ds) == 1 and len(ds[0]["z"]) == 9
    assert "'blank'" in caplog.text and "no atoms" in caplog.text and "1 record(s) skipped" in caplog.text


def test_sdf_flat_depiction_flagged_3d_is_skipped_unless_planar(tmp_path, caplog):
    from rdkit import Chem
    from rdkit.Chem import AllChem

    path = tmp_path / "z0.sdf"
    w = Chem.SDWriter(str(path))
    for smi, name in (("CCO", "flat_ethanol"), ("c1ccccc1", "benzene"), ("O", "water")):
        mol = Chem.AddHs(Chem.MolFromSmiles(smi))
        AllChem.Compute2DCoords(mol)  # z == 0 everywhere
        mol.GetConformer().Set3D(True)  # header says "3D" anyway
        mol.SetProp("_Name", name)
        w.write(mol)
    w.close()
    assert "3D" in path.read_text().splitlines()[1]
    with caplog.at_level(logging.WARNING):
        ds = read_sdf(path, ["H", "C", "N", "O", "F"])
    assert sorted(len(ds[i]["z"]) for i in range(len(ds))) == [3, 12]  # water and benzene stay
    assert "'flat_ethanol'" in caplog.text and "no 3-D coordinates" in caplog.text and "EmbedMolecule" in caplog.text
    assert "1 record(s) skipped" in caplog.text


def test_smiles_loader_and_builtin_conformers(tmp_path, caplog):
    path = tmp_path / "list.smi"
    path.write_text("CCO first\nC1CC(\nc1ccccc1Cl\nCC#N\n[NH4+]\nCC.O\nOCC ethanol again\n")
    with caplog.at_level(logging.INFO):
        kept = read_smiles_file(path, ["H", "C", "N", "O", "F"], max_heavy_atoms=9)
    assert kept == ["CCO", "CC#N"]
    assert "list.smi:7" in caplog.text and "same molecule as an earlier line" in caplog.text
    assert "list.smi:2" in caplog.text and "C1CC(" in caplog.text
    # every filtered record is named with its reason
    assert "list.smi:3" in caplog.text and "['Cl']" in caplog.text
    assert "list.smi:5" in caplog.text and "charged" in caplog.text
    assert "list.smi:6" in caplog.text and "2 fragments" in caplog.text
    bad = tmp_path / "bad.smi"
    bad.write_text("C1CC(\n")
    with pytest.raises(ValueError, match="no usable molecule"):
        read_smiles_file(bad, ["H", "C"], 9)
    dom = MoleculeDomain(
        source="smiles", path=str(path), num_conformers=2, split=(1.0, 0.0, 0.0), cache_dir=str(tmp_path / "cache")
    )
    train = dom.dataset("train")
    assert len(train) >= 2 and all(int(it["z"].eq(1).sum()) > 0 for it in train)
    assert len(list((tmp_path / "cache").glob("molecule_conformers_*.pt"))) == 1
    # conformers are physically sane: EDM-stable as built
    dom.setup(train)
    ref = dom.reference_metrics(len(train))
    assert ref["mol_stability"] == 1.0 and ref["validity"] == 1.0 and ref["novelty"] == 0.0
    with pytest.raises(ValueError, match="split of smiles data is empty"):
        dom.dataset("test")


QM9_CSV_HEADER = (
    "mol_id,A,B,C,mu,alpha,homo,lumo,gap,r2,zpve,u0,u298,h298,g298,cv,u0_atom,u298_atom,h298_atom,g298_atom"
)
QM9_SMILES = ["C", "N", "O", "CC#N"]  # molecule 2 (ammonia) is listed as uncharacterised


def _fake_qm9_raw(raw: Path, smiles: list[str] = QM9_SMILES) -> Path:
    """gdb9.sdf of ``smiles``, a csv whose molecule i has column j = i * 100 + j, and uncharacterized.txt."""
    raw.mkdir(parents=True, exist_ok=True)
    _write_sdf(raw / "gdb9.sdf", smiles)
    rows = [f"gdb_{i + 1}," + ",".join(str(float(i * 100 + j)) for j in range(19)) for i in range(len(QM9_SMILES))]
    (raw / "gdb9.sdf.csv").write_text("\n".join([QM9_CSV_HEADER, *rows]) + "\n")
    (raw / "uncharacterized.txt").write_text("\n".join(f"header {k}" for k in range(9)) + "\n2 skipped\n----\n")
    return raw


def test_qm9_loader_on_fake_raw_folder_and_missing_copy(tmp_path):
    root = tmp_path / "qm9"
    with pytest.raises(FileNotFoundError, match=r"gdb9.sdf.*raw"):
        load_qm9(root)
    raw = _fake_qm9_raw(root / "raw")
    header = QM9_CSV_HEADER
    ds = load_qm9(root)
    assert len(ds) == 3  # molecule 2 is listed as uncharacterised
    assert ds[0]["z"].tolist() == [6, 1, 1, 1, 1]
    assert ds[1]["z"].tolist()[0] == 8  # water follows the skipped ammonia
    assert float(ds[0]["y"][1]) == pytest.approx(4.0)  # alpha column, Bohr^3 in the csv and in PyG
    assert float(ds[0]["y"][4]) == pytest.approx(7.0 * 27.211386, rel=1e-5)  # gap: the csv's Hartree, PyG's eV
    dom = MoleculeDomain(source="qm9", path=str(root), condition_on="alpha", split=(3, 0, 0))
    train = dom.dataset("train")
    dom.setup(train)
    b = dom.collate([train[i] for i in range(3)])
    assert b.cond["context"].shape == (3, 1) and abs(float(b.cond["context"].mean())) < 1e-5
    space, cond = dom.prior(4, generator=torch.Generator().manual_seed(0))
    assert not torch.isnan(cond["context"]).any()
    _, cond = dom.prior(2, num_atoms=5, context=204.0)
    alphas = np.array([4.0, 204.0, 304.0])  # i * 100 + 4 for the kept molecules 0, 2, 3
    mad = np.abs(alphas - alphas.mean()).mean()  # EDM normalises properties by mean and MAD
    assert torch.allclose(cond["context"], torch.full((2, 1), (204.0 - alphas.mean()) / mad))
    broken = tmp_path / "broken"
    shutil.copytree(raw, broken / "raw")
    (broken / "raw" / "gdb9.sdf.csv").write_text(header + "\n")  # no property rows for the molecules
    with pytest.raises(ValueError, match=r"QM9 raw files in .*broken.*could not be processed.*intact copies"):
        load_qm9(broken)


QM9PACK_COLUMNS = [
    "XYZ_file",
    "Index",
    "SMILES",
    "N_atoms",
    "Elements",
    "XYZ_Ang",
    "Dipole_debye",
    "Polarizability_bohr3",
    "HOMO_au",
    "LUMO_au",
    "HOMO_LUMO_gap_au",
    "R2_bohr2",
    "ZPVE_au",
    "InternalEnergy_0K_au",
    "InternalEnergy_298K_au",
    "Enthalphy_298K_au",
    "GibbsFreeEnergy_298K_au",
    "Heatcapacity_Cv_cal_mol_K",
]


def write_fake_qm9pack(root: Path, smiles: list[str], parts: tuple[list[int], ...] | None = None) -> Path:
    """A package ``qm9pack`` under ``root`` whose CSV files hold ``smiles`` as qm9pack writes QM9 (molecule i has
    Index i + 1 and property column j the value i + j / 100; ``parts`` lists the molecules of each file)."""
    import csv

    data = root / "qm9pack" / "data"
    data.mkdir(parents=True, exist_ok=True)
    (root / "qm9pack" / "__init__.py").write_text(
        "raise ImportError('polydiff reads the data files without importing this')\n"
    )
    parts = parts or (list(range(len(smiles))), [], [])
    for k, members in enumerate(parts, start=1):
        with open(data / f"qm9_part{k}.csv", "w", newline="") as f:
            w = csv.writer(f, quoting=csv.QUOTE_NONNUMERIC)
            w.writerow(QM9PACK_COLUMNS)
            for i in members:
                mol = _embedded(smiles[i], seed=i)
                symbols = [a.GetSymbol() for a in mol.GetAtoms()]
                xyz = mol.GetConformer().GetPositions().round(6).tolist()
                props = [i + j / 100 for j in range(12)]
                w.writerow(
                    [
                        f"dsgdb9nsd_{i + 1:06d}.xyz",
                        i + 1,
                        smiles[i],
                        len(symbols),
                        "[" + ",".join(f"'{s}'" for s in symbols) + "]",
                        str(xyz).replace(" ", ""),
                        *props,
                    ]
                )
    return root


def test_qm9_from_the_qm9pack_package(tmp_path, monkeypatch):
    """source=qm9 without a path reads the installed qm9pack's CSV files (found, not imported), in QM9's index
    order whatever file a molecule is in, with PyG's units, so conditioning reads the same values."""
    from domains.molecule import qm9

    smiles = ["C", "O", "CC#N", "CCO", "N"]
    monkeypatch.syspath_prepend(str(write_fake_qm9pack(tmp_path / "site", smiles, parts=([3, 0], [4, 2], [1]))))
    ds = qm9.load_qm9_package()
    assert [len(z) for z in ds.z] == [5, 3, 6, 9, 4]  # CH4, H2O, CH3CN, ethanol, NH3 by index
    assert ds.smiles == smiles and ds.pos[3].shape == (9, 3)
    assert float(ds.y[3][0]) == pytest.approx(3.0)  # mu, Debye in both
    assert float(ds.y[3][2]) == pytest.approx(3.02 * 27.211386246, rel=1e-6)  # homo: Hartree in the csv, eV in PyG
    assert float(ds.y[3][11]) == pytest.approx(3.11)  # Cv, cal/(mol K) in both
    dom = MoleculeDomain(source="qm9", condition_on="homo", split=(3, 1, 1))
    train = dom.dataset("train")
    dom.setup(train)
    assert len(train) == 3 and len(dom.dataset("val")) == 1
    homos = {round(float(train[k]["y"][0]), 4) for k in range(3)}
    assert homos <= {round((i + 0.02) * 27.211386246, 4) for i in range(5)}
    # Bad files name the file, the line and the record.
    part = tmp_path / "site" / "qm9pack" / "data" / "qm9_part2.csv"
    text = part.read_text()
    part.write_text(text.replace("'C','C','N'", "'C','C','Si'", 1))
    with pytest.raises(ValueError, match=r"qm9_part2.csv, line 3 \(dsgdb9nsd_000003.xyz\).*\['Si'\]"):
        qm9.load_qm9_package()
    part.write_text(text.replace('"N",4,', '"N",6,', 1))
    with pytest.raises(
        ValueError, match=r"qm9_part2.csv, line 2 \(dsgdb9nsd_000005.xyz\): 4 elements, 12 coordinates and N_atoms=6"
    ):
        qm9.load_qm9_package()
    part.write_text(text.replace("HOMO_au", "HOMO"))
    with pytest.raises(ValueError, match=r"qm9_part2.csv lacks the column\(s\) \['HOMO_au'\]"):
        qm9.load_qm9_package()
    part.unlink()
    with pytest.raises(FileNotFoundError, match=r"lacks \['qm9_part2.csv'\].*reinstall"):
        qm9.load_qm9_package()
    # Neither the package nor a path: both ways to get QM9 are named when the data are first read (a run's
    # checkpoint serves sampling without them).
    monkeypatch.setattr(qm9.importlib.util, "find_spec", lambda name: None)
    domain = MoleculeDomain(source="qm9")
    with pytest.raises(FileNotFoundError, match=r"pip install qm9pack.*raw.*domain.path=DIR"):
        domain.dataset("train")


SIZED_SMILES = [
    "C",
    "N",
    "O",
    "CC",
    "CO",
    "CN",
    "C=O",
    "C#N",
    "CCO",
    "CCN",
    "CC=O",
    "OCO",
    "NC=O",
    "CC#N",
    "COC",
    "CNC",
    "C=C",
    "C#C",
    "CF",
    "FCF",
    "CCC",
    "CCCO",
    "CC(C)C",
    "CCOC",
    "OCCO",
    "NCCN",
    "CC(=O)O",
    "CCCC",
    "C1CC1",
    "C1CCC1",
    "CCCCC",
    "OCC(O)CO",
]


def write_sized_sdf(path: Path) -> Path:
    """An SDF of :data:`SIZED_SMILES` tagged ``size``, the atom count: a property a predictor can learn."""
    from rdkit import Chem

    return _write_sdf(
        path, SIZED_SMILES, {"size": [Chem.AddHs(Chem.MolFromSmiles(s)).GetNumAtoms() for s in SIZED_SMILES]}
    )


def test_property_mae_of_a_conditional_model(tmp_path, caplog):
    """EDM's property MAE (Sec. 5.3): a predictor fitted on the validation split reads the property off molecules;
    the reference row is its error on test molecules (lower bound) and on shuffled targets (upper bound)."""
    path = write_sized_sdf(tmp_path / "m.sdf")
    kw = dict(source="sdf", path=str(path), condition_on="size", split=(0.4, 0.4, 0.2), cache_dir=str(tmp_path / "c"))
    dom = MoleculeDomain(**kw, property_epochs=150)
    dom.setup(dom.dataset("train"))
    test = dom.dataset("test")
    ref = dom.reference_metrics(len(test))
    assert ref["property_mae"] < 0.5 * ref["property_mae_shuffled"], ref
    # The atom count tells this property exactly: EDM's "#Atoms" baseline (the training mean at each count, the
    # nearest count seen in training where there is none) is off only by the distance to that count.
    seen = {int(len(it["z"])) for it in dom.dataset("train")}
    gaps = [min(abs(k - len(test[i]["z"])) for k in seen) for i in range(len(test))]
    assert ref["property_mae_num_atoms"] == pytest.approx(np.mean(gaps), abs=1e-9)
    # Generated molecules are scored against the value each was asked for: real test molecules asked for their
    # own value score the reference's MAE; asked for another's, the shuffled one.
    own = dom.collate([test[i] for i in range(len(test))])
    assert dom.evaluate(own)["property_mae"] == pytest.approx(ref["property_mae"], rel=1e-5)
    others = Batch(own.x, own.space, {**own.cond, "context": own.cond["context"].roll(1, 0)})
    assert dom.evaluate(others)["property_mae"] > 2 * ref["property_mae"]
    unconditional = Batch(own.x, own.space, {**own.cond, "context": torch.full_like(own.cond["context"], float("nan"))})
    assert "property_mae" not in dom.evaluate(unconditional)  # no value asked for: nothing to compare
    # Saved samples keep the value asked for as an SD tag, and are scored the same when read back.
    dom.save_samples(own, tmp_path / "out")
    assert dom.evaluate(dom.read_samples(tmp_path / "out" / "samples.sdf"))["property_mae"] == pytest.approx(
        ref["property_mae"], rel=1e-4
    )
    assert torch.isnan(dom.read_samples(tmp_path / "out" / "samples_xyz").cond["context"]).all()  # XYZ: no tags
    from rdkit import Chem

    mols = list(Chem.SDMolSupplier(str(tmp_path / "out" / "samples.sdf"), sanitize=False, removeHs=False))
    mols[1].SetProp("size", "1e400")  # read as inf
    with Chem.SDWriter(str(tmp_path / "bad.sdf")) as w:
        for mol in mols:
            w.write(mol)
    with pytest.raises(ValueError, match=r"bad.sdf record 2.*size tag '1e400' is not a finite number"):
        dom.read_samples(tmp_path / "bad.sdf")
    # A diverged sample (NaN coordinates) has no prediction: left out, and counted.
    diverged = own.x.clone()
    diverged[own.cond["batch"] == 0, :3] = float("nan")
    m = dom.evaluate(Batch(diverged, own.space, own.cond))
    assert m["property_scored"] == pytest.approx(1 - 1 / len(test)) and ref["property_scored"] == 1.0
    # The fit is cached by data and settings: a new domain reads it back and predicts the same.
    caplog.clear()
    with caplog.at_level(logging.INFO):
        again = MoleculeDomain(**kw, property_epochs=150)
        again.setup(again.dataset("train"))
        assert again.reference_metrics(len(test)) == ref
    assert "fitting the property predictor" not in caplog.text
    off = MoleculeDomain(**kw, property_epochs=0)
    off.setup(off.dataset("train"))
    assert "property_mae" not in off.evaluate(own) and "property_mae" in again.evaluate(own)
    with pytest.raises(ValueError, match="domain.property_epochs=-1"):
        MoleculeDomain(**kw, property_epochs=-1)


def test_edm_metrics_on_real_qm9_match_edm_data_row():
    """EDM's metrics on real QM9 molecules (the qm9pack package of the test extra): EDM reports 99.0% atom
    stability, 95.2% molecule stability and 97.7% validity for the data set (Hoogeboom et al. 2022, Tables 1
    and 2); its bond tables and margins must give the same on a seeded 3,000 of EDM's training split."""
    from domains.molecule.data import split_indices
    from domains.molecule.qm9 import EDM_QM9_SPLIT, load_qm9_package

    ds = load_qm9_package()
    assert len(ds) == sum(EDM_QM9_SPLIT)
    train = split_indices(len(ds), EDM_QM9_SPLIT, seed=0)[0]
    pick = np.random.RandomState(0).choice(train, 3000, replace=False)
    symbol = {1: "H", 6: "C", 7: "N", 8: "O", 9: "F"}
    mols = [([symbol[a] for a in ds.z[i].tolist()], ds.pos[i].double().numpy()) for i in pick]
    m = molecule_metrics(mols, None, rdkit_second_opinion=False)
    assert 0.988 <= m["atom_stability"] <= 0.997, m  # 0.9936 on all 100,000
    assert 0.94 <= m["mol_stability"] <= 0.965, m  # 0.9529 on all 100,000
    assert 0.968 <= m["validity"] <= 0.985, m  # 0.9767 on all 100,000
    assert m["uniqueness"] > 0.995, m


def test_max_molecules_subsets_the_training_split_of_qm9_and_sdf(tmp_path, caplog):
    """max_molecules applies to every source: qm9 and sdf split first, then keep a seeded random subset of train."""
    root = tmp_path / "qm9"
    _fake_qm9_raw(root / "raw")
    full = MoleculeDomain(source="qm9", path=str(root), split=(2, 1, 0))
    with caplog.at_level(logging.INFO):
        cut = MoleculeDomain(source="qm9", path=str(root), split=(2, 1, 0), max_molecules=1)
        train = cut.dataset("train")
    assert len(full.dataset("train")) == 2 and len(train) == 1  # one of the two molecules of the same split
    assert any(torch.equal(train[0]["pos"], it["pos"]) for it in full.dataset("train"))
    assert len(cut.dataset("val")) == len(full.dataset("val")) == 1  # valid and test stay whole
    assert "domain.max_molecules=1" in caplog.text and "of the 2 qm9 training molecules" in caplog.text
    sdf = str(_write_sdf(tmp_path / "m.sdf", ["CCO", "CC#N", "C=O", "CO", "CCC"]))
    picks = [
        MoleculeDomain(source="sdf", path=sdf, split=(1.0, 0.0, 0.0), max_molecules=3, seed=s).dataset("train")
        for s in (0, 0)
    ]
    assert [len(t) for t in picks] == [3, 3]
    assert all(torch.equal(a["pos"], b["pos"]) for a, b in zip(picks[0], picks[1]))  # seeded: the same subset twice
    assert len(MoleculeDomain(source="sdf", path=sdf, split=(1.0, 0.0, 0.0), max_molecules=50).dataset("train")) == 5


def test_stale_qm9_processed_data_is_rebuilt_when_raw_files_change(tmp_path, caplog):
    root = tmp_path / "qm9"
    raw = _fake_qm9_raw(root / "raw", QM9_SMILES[:3])  # a truncated gdb9.sdf: methane, (ammonia), water
    assert len(load_qm9(root)) == 2
    assert (root / "processed" / "polydiff_raw_fingerprint.json").is_file()
    _write_sdf(raw / "gdb9.sdf", QM9_SMILES)  # the full file restored
    with caplog.at_level(logging.INFO):
        assert len(load_qm9(root)) == 3
    assert "data_v3.pt cannot be trusted" in caplog.text and "['gdb9.sdf'] changed" in caplog.text
    assert "rebuilt from the changed raw files" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert len(load_qm9(root)) == 3  # unchanged raw files: the processed data is reused quietly
    assert "rebuilt" not in caplog.text and "cannot be trusted" not in caplog.text


def test_qm9_path_one_level_too_deep_names_its_parent(tmp_path):
    raw = _fake_qm9_raw(tmp_path / "qm9" / "raw")
    with pytest.raises(FileNotFoundError, match=r"one level too deep.*Use domain.path=.*qm9$") as err:
        MoleculeDomain(source="qm9", path=str(raw)).dataset("train")
    assert "raw/raw" not in str(err.value)
    flat = tmp_path / "flat"
    shutil.copytree(raw, flat)  # files directly in the given folder, which is not named raw
    with pytest.raises(
        FileNotFoundError, match=r"holds the QM9 raw files .* directly, but they must be in .*flat/raw/"
    ):
        load_qm9(flat)


def test_qm9_is_never_downloaded_and_a_processed_only_copy_is_read(tmp_path, monkeypatch):
    """PyG's QM9 calls download() whenever a raw file is missing, even with processed/ in place: polydiff's never
    fetches."""
    import torch_geometric.datasets.qm9 as pyg_qm9

    def no_download(*args, **kwargs):
        raise AssertionError("torch_geometric tried to download QM9")

    monkeypatch.setattr(pyg_qm9, "download_url", no_download)
    built = tmp_path / "built"
    _fake_qm9_raw(built / "raw")
    assert len(load_qm9(built)) == 3
    copy = tmp_path / "copy"
    shutil.copytree(built / "processed", copy / "processed")  # processed/ only, no raw files
    ds = load_qm9(copy)
    assert len(ds) == 3 and ds[0]["z"].tolist() == [6, 1, 1, 1, 1]
    assert (copy / "processed" / "data_v3.pt").is_file()  # never deleted as if it were damaged

    empty = tmp_path / "empty"
    with pytest.raises(
        FileNotFoundError, match=r"missing under .*empty/raw\. polydiff never downloads data: place gdb9"
    ):
        _local_qm9(empty, ["gdb9.sdf"], empty / "processed" / "data_v3.pt")  # download() itself refuses


def test_qm9_processed_folder_that_cannot_be_written_is_named(tmp_path, monkeypatch):
    root = tmp_path / "qm9"
    _fake_qm9_raw(root / "raw")
    (root / "processed").write_text("")  # a file where PyG writes its parse
    with pytest.raises(
        ValueError,
        match=r"cannot write QM9's processed data to .*qm9/processed/ .*is a file, not a "
        r"folder: move or delete it",
    ) as err:
        load_qm9(root)
    assert "raw files in" not in str(err.value) and isinstance(
        err.value, OSError
    )  # a ValueError too: the CLI's plain message
    (root / "processed").unlink()

    def read_only(data, path):  # what a processed/ folder without write permission gives (root ignores chmod)
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr("torch_geometric.io.fs.torch_save", read_only)
    with pytest.raises(
        ValueError,
        match=r"cannot write QM9's processed data to .*qm9/processed/ \(PermissionError.*"
        r"Fix: make .*qm9/processed writable, or copy .*qm9/raw/ into a writable folder",
    ):
        load_qm9(root)


def test_edm_txt_sample_files_are_read_as_xyz(tmp_path):
    """EDM writes its samples as XYZ text in molecule_000.txt: read as files and in folders; other .txt is refused."""
    from domains.molecule.data import read_sample_molecules

    edm = tmp_path / "edm"
    edm.mkdir()
    (edm / "molecule_000.txt").write_text("3\n\nO 0.0 0.0 0.0\nH 0.96 0.0 0.0\nH -0.24 0.93 0.0\n")
    (edm / "molecule_001.txt").write_text(
        "5\n\nC 0 0 0\nH 0.63 0.63 0.63\nH -0.63 -0.63 0.63\nH -0.63 0.63 -0.63\nH 0.63 -0.63 -0.63\n"
    )
    mols = read_sample_molecules(edm)
    assert [m[0] for m in mols] == [["O", "H", "H"], ["C", "H", "H", "H", "H"]]
    assert read_sample_molecules(edm / "molecule_001.txt")[0][1].shape == (5, 3)
    dom = MoleculeDomain(source="sdf", path="/x", atom_types=["H", "C", "N", "O", "F"])
    assert dom.read_samples(edm).num_samples == 2
    (edm / ".ipynb_checkpoints").mkdir()  # Jupyter's copies and other hidden files are not samples
    (edm / ".ipynb_checkpoints" / "molecule_000-checkpoint.txt").write_text("not XYZ\n")
    (edm / "._molecule_000.txt").write_bytes(b"\x00\x05\x16\x07")  # a macOS resource fork
    assert len(read_sample_molecules(edm)) == 2
    (edm / "notes.txt").write_text("sampled with seed 3\n")
    with pytest.raises(ValueError, match=r"notes.txt is a .txt file but not XYZ .*move other .txt files out"):
        read_sample_molecules(edm)


def test_context_is_in_torch_geometric_units_and_far_values_are_warned(tmp_path, caplog):
    gap = MoleculeDomain(source="qm9", path="/x", condition_on="gap")
    with pytest.raises(ValueError, match=r"gap in eV, torch_geometric's QM9 units, not the csv's Hartree.*meV"):
        gap.parse_label("3")
    assert MoleculeDomain(source="qm9", path="/x", condition_on="alpha").context_units().startswith("Bohr^3")
    assert MoleculeDomain(source="qm9", path="/x", condition_on="Cv").context_units().startswith("cal/(mol K)")
    sdf = _write_sdf(tmp_path / "m.sdf", ["CCO", "CC#N", "C=O", "CO"], {"alpha": [60.0, 64.0, 70.0, 62.0]})
    dom = MoleculeDomain(source="sdf", path=str(sdf), condition_on="alpha", split=(1.0, 0.0, 0.0))
    dom.setup(dom.dataset("train"))
    assert "SD tag 'alpha'" in dom.context_units()
    # Given atom counts and no context, the property is drawn among training molecules of that size (EDM's p(c | N)).
    norm = lambda values: dom.conditioning.normalise(torch.tensor(values).unsqueeze(-1))  # noqa: E731
    _, cond = dom.prior(40, num_atoms=6, generator=torch.Generator().manual_seed(0))  # CC#N and CO: 64 and 62
    assert set(cond["context"].flatten().tolist()) == set(norm([64.0, 62.0]).flatten().tolist())
    _, cond = dom.prior(3, num_atoms=9)  # ethanol only
    assert torch.allclose(cond["context"], norm([60.0] * 3))
    with caplog.at_level(logging.WARNING):
        _, cond = dom.prior(2, num_atoms=5)  # no 5-atom molecule: the nearest count, 4 (C=O, 70)
    assert torch.allclose(cond["context"], norm([70.0] * 2)) and "no training molecule has [5] atoms" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        dom.prior(2, num_atoms=5, context=[66.0, 58.0])  # inside: mean 64, mean absolute deviation 3
    assert "prior.context" not in caplog.text
    with caplog.at_level(logging.WARNING):
        dom.prior(2, num_atoms=5, context=0.27)
    assert "prior.context=0.27 is far outside the training distribution of alpha" in caplog.text
    assert "training mean 64, range [60, 70]" in caplog.text and "21.2 deviations" in caplog.text
    fresh = MoleculeDomain(source="sdf", path=str(sdf), condition_on="alpha")  # a checkpoint keeps the range
    fresh.load_state_dict(dom.state_dict())
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        fresh.prior(1, num_atoms=5, context=100.0)
    assert "prior.context=100 is far outside" in caplog.text and "range [60, 70]" in caplog.text
    # The SDF of conditional samples records the property each molecule was asked for (null: empty).
    space, cond = dom.prior(3, num_atoms=4, context=[61.5, 66.0, 70.0])
    cond["context"][2] = float("nan")
    dom.save_samples(Batch(space.randn(), space, cond), tmp_path / "out")
    from rdkit import Chem

    asked = [
        m.GetProp("alpha")
        for m in Chem.SDMolSupplier(str(tmp_path / "out" / "samples.sdf"), sanitize=False, removeHs=False)
    ]
    assert asked == ["61.5", "66", ""]


def test_rdkit_valence_messages_are_silenced_not_disabled(capfd, caplog):
    """RDKit's "Explicit valence ..." lines are silenced around setup and scoring, and its logger restored after."""
    from rdkit import RDLogger, rdBase

    from domains.molecule.data import MoleculeSet

    methane5 = torch.tensor([[0.0, 0, 0], [1.09, 0, 0], [-1.09, 0, 0], [0, 1.09, 0], [0, -1.09, 0], [0, 0, 1.09]])
    train = MoleculeSet([torch.tensor([6, 1, 1, 1, 1, 1])], [methane5])  # a pentavalent carbon
    before = rdBase.LogStatus()
    RDLogger.EnableLog("rdApp.error")
    try:
        dom = MoleculeDomain(source="sdf", path="unused.sdf")
        capfd.readouterr()
        with caplog.at_level(logging.INFO):
            dom.setup(train)
            dom.evaluate(dom.collate([train[0]]))
        err = capfd.readouterr().err
        assert "valence" not in err, err
        assert "molecule setup: 1 training conformers, 0 distinct EDM SMILES" in caplog.text  # ours still shown
        assert "rdApp.error:enabled" in rdBase.LogStatus()  # RDKit's logger is back on for everyone else
    finally:
        if "rdApp.error:disabled" in before:
            RDLogger.DisableLog("rdApp.error")


def test_reading_files_silences_rdkit_while_reading_only(tmp_path, capfd):
    """read_smiles_file and read_sdf keep RDKit's own messages on bad records out of the output (ours name
    them), then give RDKit its logger back as it was."""
    from rdkit import RDLogger, rdBase

    from domains.molecule.data import read_sdf, read_smiles_file

    smi = tmp_path / "list.smi"
    smi.write_text("CCO\nC1CC(\nC(C)(C)(C)(C)C\n")  # unparsable; a pentavalent carbon
    sdf = tmp_path / "bad.sdf"
    sdf.write_text(
        "bad\n  RDKit          3D\n\n  1  0  0  0  0  0  0  0  0  0999 V2000\n"
        "    0.0000    0.0000    0.0000 Xx  0  0  0  0  0  0  0  0  0  0  0  0\nM  END\n$$$$\n"
    )
    before = rdBase.LogStatus()
    RDLogger.EnableLog("rdApp.error")
    try:
        capfd.readouterr()
        assert read_smiles_file(smi, ["H", "C", "O"], 9) == ["CCO"]
        with pytest.raises(ValueError, match="no usable molecule"):
            read_sdf(sdf, ["H", "C"])
        err = capfd.readouterr().err
        assert "Parse Error" not in err and "valence" not in err and "Xx" not in err, err
        assert "rdApp.error:enabled" in rdBase.LogStatus()
    finally:
        if "rdApp.error:disabled" in before:
            RDLogger.DisableLog("rdApp.error")


def test_bad_domain_configuration_messages():
    with pytest.raises(ValueError, match=r"'xyz' is unknown; choose one of \['builtin', 'smiles', 'sdf', 'qm9'\]"):
        MoleculeDomain(source="xyz")
    with pytest.raises(ValueError, match="needs domain.path"):
        MoleculeDomain(source="sdf")
    with pytest.raises(ValueError, match="not a QM9 target"):
        MoleculeDomain(source="qm9", path="/x", condition_on="homo_lumo")
    with pytest.raises(ValueError, match="prior.context"):
        MoleculeDomain().parse_label("3")


def test_a_data_source_is_a_row_of_the_table_and_the_checkpoint_keys_are_unchanged(tmp_path, monkeypatch):
    """A new source is a loader in ``SOURCES``; the domain state keeps the keys checkpoints have always held."""
    from domains.molecule.sources import SOURCES, Source, load_sdf

    sdf = _write_sdf(tmp_path / "m.sdf", ["CCO", "CC#N", "C=O", "CO"], {"alpha": [60.0, 64.0, 70.0, 62.0]})
    monkeypatch.setitem(SOURCES, "tagged", Source(load_sdf, needs_path=True, properties=("alpha",)))
    with pytest.raises(ValueError, match=r"condition_on='gap' is not a TAGGED target; choose one of \['alpha'\]"):
        MoleculeDomain(source="tagged", path=str(sdf), condition_on="gap")
    dom = MoleculeDomain(source="tagged", path=str(sdf), condition_on="alpha", split=(1.0, 0.0, 0.0))
    dom.setup(dom.dataset("train"))
    state = dom.state_dict()
    assert list(state) == [
        "atom_types",
        "num_atoms_hist",
        "condition_on",
        "context_stats",
        "context_range",
        "context_pairs",
        "train_smiles",
    ]
    assert state["context_stats"] == [64.0, 3.0] and state["context_range"] == [60.0, 70.0]
    fresh = MoleculeDomain(source="sdf", path="unused.sdf", condition_on="alpha")
    fresh.load_state_dict(state)
    assert fresh.state_dict() == state


# ----------------------------------------------------------------- outputs
def test_save_samples_writes_sdf_xyz_png(tmp_path):
    from rdkit import Chem

    dom = MoleculeDomain(source="sdf", path=str(_write_sdf(tmp_path / "m.sdf", ["CCO", "CC#N"])), split=(1.0, 0.0, 0.0))
    train = dom.dataset("train")
    dom.setup(train)
    batch = dom.collate([train[0], train[1]])
    noisy = Batch(
        batch.x + torch.randn(batch.x.shape, generator=torch.Generator().manual_seed(0)) * 0.5, batch.space, batch.cond
    )
    both = Batch(
        torch.cat([batch.x, noisy.x]),
        RaggedSpace(torch.cat([batch.cond["batch"], batch.cond["batch"] + 2]), 4, 3 + F, (0, 1, 2)),
        {"batch": torch.cat([batch.cond["batch"], batch.cond["batch"] + 2])},
    )
    paths = dom.save_samples(both, tmp_path / "out", prefix="s")
    sdf = Chem.SDMolSupplier(str(tmp_path / "out" / "s.sdf"), removeHs=False, sanitize=False)
    mols = [m for m in sdf]
    assert len(mols) == 4
    for m in mols[:2]:  # the clean inputs: ethanol (9 atoms, 8 bonds) and acetonitrile (6 atoms, 5 bonds)
        assert m.GetNumBonds() == m.GetNumAtoms() - 1 and m.GetProp("stable") == "1" and m.GetProp("valid") == "1"
    xyz = sorted((tmp_path / "out" / "s_xyz").glob("*.xyz"))
    assert len(xyz) == 4 and xyz[0].read_text().splitlines()[0] == str(mols[0].GetNumAtoms())
    png = tmp_path / "out" / "s.png"
    assert png.read_bytes()[:4] == b"\x89PNG" and png in paths
    metrics = dom.evaluate(both)
    assert metrics["mol_stability"] >= 0.5 and metrics["novelty"] <= 0.5
    # Read back for scoring (polydiff eval): the SDF and the XYZ files give the same figures, and the
    # noisy molecules are read unsanitised, not skipped.
    for written in (tmp_path / "out" / "s.sdf", tmp_path / "out" / "s_xyz", tmp_path / "out"):  # the folder: once
        back = dom.read_samples(written)
        assert back.num_samples == 4 and back.x.shape == both.x.shape
        scored = dom.evaluate(back)
        for key in ("atom_stability", "mol_stability", "validity", "novelty"):
            assert scored[key] == pytest.approx(metrics[key]), (written, key)
    (tmp_path / "cl.xyz").write_text("2\nhydrogen chloride\nH 0 0 0\nCl 0 0 1.27\n")
    with pytest.raises(ValueError, match=r"cl.xyz line 1: elements \['Cl'\] are outside"):
        dom.read_samples(tmp_path / "cl.xyz")
    (tmp_path / "bad.xyz").write_text("3\ncut short\nC 0 0 0\nH 0 0 1.1\n")
    with pytest.raises(ValueError, match="bad.xyz line 1: not an XYZ frame"):
        dom.read_samples(tmp_path / "bad.xyz")


def _kekule_benzene() -> tuple[list[str], np.ndarray]:
    """A planar C6H6 whose ring bonds alternate 1.33 / 1.46 Angstrom: EDM infers double / single."""
    ring, angle = [np.zeros(2)], 0.0
    for k in range(5):
        ring.append(ring[-1] + (1.33 if k % 2 == 0 else 1.46) * np.array([np.cos(angle), np.sin(angle)]))
        angle += np.pi / 3
    ring = np.array(ring) - np.mean(ring, axis=0)  # [6, 2]
    hydrogens = ring * (1 + 1.08 / np.linalg.norm(ring, axis=1, keepdims=True))  # [6, 2]
    pos = np.concatenate([np.c_[ring, np.zeros(6)], np.c_[hydrogens, np.zeros(6)]])  # [12, 3]
    return ["C"] * 6 + ["H"] * 6, pos


def test_sdf_bonds_are_the_inferred_orders_not_aromatic(tmp_path):
    """A valid aromatic sample keeps EDM's single/double bonds in the SDF (V2000 type 4 is query-only)."""
    from rdkit import Chem

    from domains.molecule.bonds import bond_order_matrix
    from domains.molecule.outputs import write_sdf

    symbols, pos = _kekule_benzene()
    orders = bond_order_matrix(symbols, pos)
    assert sorted(orders[0][:6].tolist()) == [0, 0, 0, 0, 1, 2]
    write_sdf([(symbols, pos)], tmp_path / "b.sdf")
    mol = next(iter(Chem.SDMolSupplier(str(tmp_path / "b.sdf"), removeHs=False, sanitize=False)))
    assert mol.GetProp("valid") == "1" and mol.GetProp("stable") == "1"
    written = {(b.GetBeginAtomIdx(), b.GetEndAtomIdx()): b.GetBondTypeAsDouble() for b in mol.GetBonds()}
    inferred = {(i, j): float(orders[i, j]) for i in range(12) for j in range(i + 1, 12) if orders[i, j]}
    assert {tuple(sorted(k)): v for k, v in written.items()} == inferred


def test_dense_layout_benchmark_matches_edge_list():
    """bench_egnn's dense [B, n, n] EGNN runs the same weights and equals the edge-list EGNN."""
    from benchmarks.bench_egnn import DenseEGNN, _dense, _unpad

    gen = torch.Generator().manual_seed(3)
    sizes = [5, 2, 9, 1, 7]
    x, batch, _ = _ragged(sizes, gen, dtype=torch.float32)
    t = torch.rand(len(sizes), generator=gen)
    context = torch.tensor([[0.3], [float("nan")], [-1.0], [2.0], [float("nan")]])
    torch.manual_seed(0)
    net = EGNN(F, hidden=16, layers=3, context_dim=1)
    with torch.no_grad():
        for block in net.blocks:  # large coordinate updates, so the coordinate path is exercised
            block.coord_out.weight.normal_(0.0, 0.5)
    xd, mask = _dense(x, batch, torch.tensor(sizes))
    dense = DenseEGNN(net)(xd, t, mask, context)  # [B, 9, 3+F]
    edge = net(x, t, batch, context)  # [N, 3+F]
    assert dense[~mask].abs().max() == 0
    assert edge[:, :3].abs().max() > 0.1
    torch.testing.assert_close(_unpad(dense, batch, torch.tensor(sizes)), edge, atol=1e-5, rtol=1e-5)


def test_damaged_conformer_cache_is_rebuilt(tmp_path, caplog):
    from domains.molecule.data import conformers_from_smiles

    first = conformers_from_smiles(["CCO", "C=O"], 2, tmp_path, seed=0)
    (cache,) = tmp_path.glob("molecule_conformers_*.pt")
    cache.write_bytes(cache.read_bytes()[:100])  # a torn write from another program
    with caplog.at_level(logging.WARNING):
        again = conformers_from_smiles(["CCO", "C=O"], 2, tmp_path, seed=0)
    assert "is unreadable" in caplog.text and cache.name in caplog.text
    assert len(again) == len(first) and all(torch.equal(a["pos"], b["pos"]) for a, b in zip(first, again))


def test_grid_png_survives_molecules_rdkit_cannot_depict(tmp_path):
    """An untrained model's dense nonsense graphs (atoms on one 2-D point) are drawn as atoms, not a crash."""
    from domains.molecule.outputs import write_grid_png

    rng = np.random.default_rng(0)
    mols = [(list(rng.choice(["C", "H", "N", "O"], 16)), rng.normal(size=(16, 3)) * 0.8) for _ in range(10)]
    path = write_grid_png(mols, tmp_path / "grid.png")
    assert path.read_bytes()[:4] == b"\x89PNG"


# An early QM9 run's sample (step 200): RDKit lays its dense graph out with a bond of zero length in 2-D.
ZERO_BOND = (
    list("NNFNNNNNNNNNNNCCNN"),
    [[0.464, 0.252, 0.892], [1.867, 0.192, -1.016], [-0.592, 0.833, 0.242], [-3.118, 0.999, -1.256],
     [-0.713, -0.209, -1.18], [0.857, 0.262, -0.163], [-0.181, -0.786, 2.863], [0.598, -0.033, -0.735],
     [0.43, 0.341, -1.137], [-0.385, -0.482, 1.358], [-0.611, -0.915, 0.775], [-0.798, -0.127, -0.327],
     [-1.554, -0.262, -1.174], [1.518, -0.906, -0.035], [0.918, -0.145, -0.134], [-0.235, 0.427, -0.87],
     [1.049, 0.424, 0.869], [0.485, 0.135, 1.028]],
)  # fmt: skip


def test_the_report_depicts_a_molecule_whose_2d_layout_has_a_zero_length_bond(tmp_path):
    """The report's single depiction and the grid draw the same fallback (atoms only) instead of failing the page."""
    from domains.molecule.outputs import depiction_png, write_grid_png

    symbols, pos = ZERO_BOND[0], np.array(ZERO_BOND[1])
    png, ok = depiction_png(symbols, pos)
    assert png[:4] == b"\x89PNG" and not ok
    assert write_grid_png([(symbols, pos)], tmp_path / "grid.png").read_bytes()[:4] == b"\x89PNG"


def test_egnn_traces_for_torch_compile_with_one_break():
    """torch.compile sees the EGNN as two graphs around the (eager) edge-list builder, not one per data-dependent op."""
    net = EGNN(num_features=F, hidden=16, layers=2)
    batch = torch.repeat_interleave(torch.arange(3), torch.tensor([3, 5, 4]))
    explained = torch._dynamo.explain(net)(torch.randn(12, 3 + F), torch.rand(3), batch)
    assert explained.graph_break_count == 1 and explained.graph_count == 2, explained.break_reasons


def test_batched_guidance_on_ragged_molecules_equals_two_calls(tmp_path):
    """Stacking a ragged batch with its null-context copy offsets the atoms' batch vector: the guided samples
    of one EGNN call per step equal those of two calls, and stay centred."""
    sdf = _write_sdf(tmp_path / "m.sdf", ["CCO", "CC#N", "C=O", "CO"], {"alpha": [60.0, 64.0, 70.0, 62.0]})
    dom = MoleculeDomain(source="sdf", path=str(sdf), condition_on="alpha", split=(1.0, 0.0, 0.0))
    dom.setup(dom.dataset("train"))
    torch.manual_seed(0)
    net = dom.build_network(hidden=16, layers=2)
    sch, obj = make_schedule("polynomial", 100), Objective("eps")
    draws = {}
    for batched in (True, False):
        out = generate(
            dom,
            net,
            sch,
            obj,
            3,
            {"name": "ddim", "steps": 4},
            guidance={"scale": 2.0, "batched": batched},
            prior={"num_atoms": [4, 6, 9], "context": [61.0, 66.0, 69.0]},
            generator=torch.Generator().manual_seed(1),
        )
        draws[batched] = out.x
    torch.testing.assert_close(draws[True], draws[False], rtol=1e-4, atol=1e-5)
    centre = torch.zeros(3, 3).index_add_(0, out.cond["batch"], draws[True][:, :3]) / torch.tensor(
        [[4.0], [6.0], [9.0]]
    )
    assert centre.abs().max() < 1e-4


def test_features_are_edm_scaled_one_hots_and_unknown_elements_are_named():
    dom = MoleculeDomain()
    f = dom.features(torch.tensor([1, 6, 7, 8, 9, 6]))  # H C N O F C
    assert f.shape == (6, F)
    assert torch.equal(f[:, :5], torch.eye(5)[[0, 1, 2, 3, 4, 1]] / 4)  # one-hot / 4
    assert torch.allclose(f[:, 5], torch.tensor([1.0, 6, 7, 8, 9, 6]) / 10)  # atomic number / 10
    for z in (17, 0, 200):
        with pytest.raises(ValueError, match=rf"atomic number {z} is outside domain.atom_types"):
            dom.features(torch.tensor([6, z]))


# ------------------------------------------------------------ EDM's likelihood protocol (Hoogeboom et al. 2022)
def test_log_p_n_is_the_log_of_the_training_histogram_and_the_features_are_edms_discrete_columns():
    dom = MoleculeDomain()
    dom.num_atoms_hist = [0, 0, 0, 1, 0, 3]  # training molecules: one of 3 atoms, three of 5
    z = [torch.tensor([6, 1, 1]), torch.tensor([6, 1, 1, 1, 1]), torch.tensor([8, 1, 1, 1]), torch.tensor([1] * 9)]
    batch = dom.collate([{"z": zi, "pos": torch.randn(len(zi), 3)} for zi in z])
    got = dom.log_prob_layout(batch)
    assert got.tolist() == pytest.approx([math.log(1 / 4), math.log(3 / 4), math.log(1e-30), math.log(1e-30)])
    spec = dom.discrete_features()
    assert spec.categorical == (3, 4, 5, 6, 7) and spec.integer == (8,)
    onehot = batch.x[:, list(spec.categorical)] * spec.categorical_scale  # [N, 5]: exactly one-hot
    assert torch.equal(onehot.sum(1), torch.ones(len(batch.x))) and set(onehot.flatten().tolist()) == {0.0, 1.0}
    assert (batch.x[:, 8] * spec.integer_scale).round().tolist() == torch.cat(z).float().tolist()
    with pytest.raises(RuntimeError, match="no atom-count histogram"):
        MoleculeDomain().log_prob_layout(batch)


def test_eval_nll_of_a_molecule_run_follows_edms_protocol(tmp_path, monkeypatch):
    """``polydiff eval --nll``: -log p(x, h, N) per molecule = prior + diffusion + decoder (CoM-free positions,
    categorical atom types, integer charges) + -log p(N) under the run's training histogram."""
    from tests.common import cli

    monkeypatch.setenv("POLYDIFF_CACHE", str(tmp_path / "cache"))
    sdf = _write_sdf(tmp_path / "m.sdf", ["CCO", "COC", "CCN", "CNC"] * 3)  # 9 and 10 atoms, six of each
    run = tmp_path / "run"
    tiny = ["model.hidden=16", "model.layers=1", "trainer.batch_size=4", "trainer.num_samples=2", "sampler.steps=2"]
    data = ["domain.source=sdf", f"domain.path={sdf}", "+domain.split=[0.5,0.25,0.25]"]
    assert (
        cli(
            "train",
            "recipes/molecule_egnn.yaml",
            "profile=cpu",
            "trainer.max_steps=2",
            *tiny,
            *data,
            f"hydra.run.dir={run}",
        )
        == ""
    )
    hist = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["domain_state"]["num_atoms_hist"]
    for kind in ("bound", "ode"):
        out = tmp_path / f"{kind}.json"
        assert cli("eval", "--nll", kind, str(run), "--steps", "3", "--json", str(out)) == ""
        r = json.loads(out.read_text())
        assert (
            r["n"] == 3
            and r["layout_unseen"] == 0
            and all(math.isfinite(v) for v in r.values() if isinstance(v, float))
        )
        dom = MoleculeDomain(source="sdf", path=str(sdf), split=(0.5, 0.25, 0.25))
        sizes = [len(dom.dataset("test")[i]["z"]) for i in range(3)]
        assert r["layout_nats"] == pytest.approx(float(np.mean([-math.log(hist[k] / sum(hist)) for k in sizes])))
        assert r["dims_mean"] == pytest.approx(float(np.mean([(k - 1) * 3 + k * F for k in sizes])))
        assert r["nll_nats_per_dim"] == pytest.approx(r["nll_bpd"] * math.log(2), rel=1e-9)
        assert "categorical over columns [3, 4, 5, 6, 7] (scale 4); integer over columns [8] (scale 10)" in r["decoder"]
        if kind == "bound":
            terms = r["prior_nats"] + r["diffusion_nats"] + r["decoder_nats"] + r["layout_nats"]
            assert r["nll_nats"] == pytest.approx(terms, rel=1e-9)
            parts = r["decoder_continuous_nats"] + r["decoder_categorical_nats"] + r["decoder_integer_nats"]
            assert r["decoder_nats"] == pytest.approx(parts, rel=1e-9)
            assert (
                "categorical over columns [3, 4, 5, 6, 7] (scale 4); integer over columns [8] (scale 10)"
                in r["decoder"]
            )
        else:  # the ODE's density of a state drawn near the data, EDM's decoders from it (variational dequantisation)
            assert {
                "decoder_categorical_nats",
                "decoder_integer_nats",
                "dequantisation_nats",
                "divergence_nats",
            } <= set(r)
