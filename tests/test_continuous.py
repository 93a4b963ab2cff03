"""The continuous-time family against closed forms and k-diffusion: flow matching, EDM, Euler, Heun, SDE, ODE.

For Gaussian data ``x0 ~ N(mu, v)`` the optimal denoiser is known exactly on every path, so a sampler driven by it
must return the data's law; and k-diffusion's own Euler and Heun, driving the same exact denoiser on the same
noise levels, must return the same samples as polydiff's.
"""

import importlib.metadata
import importlib.util
import math
import sys
import types

import pytest
import torch
from common import MU, TINY_POINTS, VAR, cli, exact_denoiser

from polydiff import DenseSpace, RaggedSpace
from polydiff.config import retarget_plugins
from polydiff.couplings import couple, kabsch_rotation
from polydiff.edm import PRECONDITIONINGS, EDMObjective, preconditioning
from polydiff.flow import FlowObjective, sample_times
from polydiff.objectives import build_objective_from, loss_weight
from polydiff.paths import EDMSchedule, FlowSchedule
from polydiff.resume import IncompatibleCheckpointError, check_compatible
from polydiff.samplers import sample
from polydiff.schedules import make_schedule
from polydiff.sigma_samplers import karras_sigmas, sigma_grid
from polydiff.state import Batch

torch.set_num_threads(1)


SCHEDULES = {
    "vp-linear": lambda: make_schedule("linear", 1000),
    "flow": FlowSchedule,
    "edm": EDMSchedule,
}
CASES = [("euler", 200, {}), ("heun", 40, {}), ("heun", 40, {"s_churn": 10.0}), ("sde", 400, {}), ("ode", 1, {})]


@pytest.mark.parametrize("path", sorted(SCHEDULES))
@pytest.mark.parametrize("name,steps,opts", CASES, ids=lambda c: str(c))
def test_samplers_return_the_data_law_on_every_path(path, name, steps, opts):
    schedule = SCHEDULES[path]()
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(8000, 1, generator=g, dtype=torch.float64)
    x = sample(name, exact_denoiser(schedule), noise, schedule, steps, generator=g, **opts)
    assert torch.isfinite(x).all()
    # Sampling error of the moments at n = 8k is ~0.006 (mean) and ~0.004 (std); the rest is discretisation.
    assert abs(float(x.mean()) - MU) < 0.02
    assert abs(float(x.std()) - math.sqrt(VAR)) < 0.02


@pytest.mark.parametrize("path", ["vp-linear", "flow"])
def test_heun_is_second_order_and_euler_first(path):
    """Halving the step doubles Heun's accuracy twice over and Euler's once (error of the std against 200 steps)."""
    schedule = SCHEDULES[path]()
    noise = torch.randn(4000, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    std = lambda name, n: float(sample(name, exact_denoiser(schedule), noise, schedule, n).std())
    for name, order in (("euler", 1), ("heun", 2)):
        ref = std(name, 400)
        ratio = abs(std(name, 20) - ref) / abs(std(name, 40) - ref)
        assert 2**order * 0.7 < ratio < 2**order * 1.4, (name, ratio)


def test_euler_on_a_flow_model_is_ddim_and_the_straight_euler_step():
    schedule = FlowSchedule()
    g = torch.Generator().manual_seed(2)
    noise = torch.randn(64, 3, generator=g, dtype=torch.float64)
    den = exact_denoiser(schedule)
    ours = sample("euler", den, noise, schedule, 10, grid="uniform")
    ddim = sample("ddim", den, noise, schedule, 10)
    torch.testing.assert_close(ours, ddim, rtol=0, atol=1e-12)
    x, ts = noise.clone(), torch.linspace(1, 0, 11, dtype=torch.float64)
    for t, t_next in zip(ts[:-1], ts[1:]):  # x + (t' - t) v with v = eps - x0
        x0, eps = den(x / schedule.scale(t), t.expand(64))
        x = x + (t_next - t) * (eps - x0)
    torch.testing.assert_close(ours, x, rtol=0, atol=1e-10)


# ------------------------------------------------------------------ objectives
def test_flow_denoiser_inverts_the_path_and_its_loss_regresses_the_velocity():
    g = torch.Generator().manual_seed(3)
    space = DenseSpace((5, 4))
    x0, eps = torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randn(5, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0.05, 0.3, 0.5, 0.8, 1.0], dtype=torch.float64)
    x_t = (1 - t[:, None]) * x0 + t[:, None] * eps
    objective, schedule = FlowObjective(), FlowSchedule()
    den = objective.denoiser(lambda x, tt: eps - x0, schedule, space)
    pred = den(x_t / schedule.scale(t)[:, None], t)  # the VP state the samplers hold
    torch.testing.assert_close(pred.x0, x0)
    torch.testing.assert_close(pred.eps, eps)
    # The loss is the squared velocity error: zero for the true velocity of the pair it draws.
    seen = {}

    def net(x, tt):
        seen["x"], seen["t"] = x, tt
        return torch.zeros_like(x)

    loss = objective.losses(net, Batch(x0, space), schedule, torch.Generator().manual_seed(4))
    assert loss.shape == (5,) and torch.isfinite(loss).all()
    tt = seen["t"][:, None].double()
    implied_eps = (seen["x"] - (1 - tt) * x0) / tt  # the noise the objective drew, read back from its x_t
    torch.testing.assert_close(loss, ((implied_eps - x0) ** 2).mean(1).float(), atol=1e-5, rtol=1e-5)


def test_logit_normal_times_and_bad_options():
    objective = FlowObjective(time="logit_normal", mean=0.5, std=0.3)
    t = sample_times(20000, "logit_normal", 0.5, 0.3, torch.device("cpu"), torch.Generator().manual_seed(0))
    logit = torch.log(t / (1 - t))
    assert abs(float(logit.mean()) - 0.5) < 0.01 and abs(float(logit.std()) - 0.3) < 0.01
    assert objective.time == "logit_normal"
    with pytest.raises(ValueError, match="objective.mean=nan"):
        FlowObjective(time="logit_normal", mean=float("nan"))
    with pytest.raises(ValueError, match="std=-1"):
        FlowObjective(std=-1.0)
    with pytest.raises(KeyError, match="objective.time 'normal'"):
        FlowObjective(time="normal")
    with pytest.raises(KeyError, match="objective.coupling 'ott'"):
        FlowObjective(coupling="ott")


@pytest.mark.parametrize("precond", PRECONDITIONINGS)
def test_edm_denoiser_and_loss_weight(precond):
    """D = c_skip x + c_out F inverts to the x0 it was built from; the uniform weight makes F's error unit-weighted,
    for each column of EDM's Table 1."""
    g = torch.Generator().manual_seed(5)
    space = DenseSpace((4, 3))
    objective = EDMObjective(sigma_data=0.5, precond=precond)
    x0 = torch.randn(4, 3, generator=g, dtype=torch.float64) * 0.5
    eps = torch.randn(4, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([0.2, 0.4, 0.7, 1.0], dtype=torch.float64)
    sigma = objective.path.sigma(t)
    x = x0 + sigma[:, None] * eps
    c_skip, c_out, c_in = (c[:, None] for c in preconditioning(sigma, 0.5, precond))
    torch.testing.assert_close(c_in, (sigma[:, None] ** 2 + 0.25) ** -0.5)  # unit-variance input, every column
    table = {  # (c_skip, c_out): EDM's own column, x0-prediction, and the VP column (D = x - sigma F)
        "edm": (0.25 / (sigma**2 + 0.25), 0.5 * sigma / (sigma**2 + 0.25).sqrt()),
        "x0": (torch.zeros(4, dtype=torch.float64), torch.full((4,), 0.5, dtype=torch.float64)),
        "eps": (torch.ones(4, dtype=torch.float64), -sigma),
    }[precond]
    torch.testing.assert_close((c_skip[:, 0], c_out[:, 0]), table)

    def perfect(x_in, tt):  # the F whose D is x0 (x_in = c_in x)
        return (x0 - c_skip * x_in / c_in) / c_out

    pred = objective.denoiser(perfect, objective.path, space)(x / objective.path.scale(t)[:, None], t)
    torch.testing.assert_close(pred.x0, x0)
    torch.testing.assert_close(pred.eps, eps)
    # An error delta in F costs delta^2 at every sigma: lambda * c_out^2 = 1 (EDM eq. 8).
    lam = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    torch.testing.assert_close(lam * preconditioning(sigma, 0.5)[1] ** 2, torch.ones(4, dtype=torch.float64))

    def off_by_a_tenth(x_in, tt):  # the perfect F for the state the objective drew, plus 0.1 everywhere
        c_skip, c_out, c_in = (c[:, None] for c in preconditioning(objective.path.sigma(tt), 0.5, precond))
        return (x0 - c_skip * x_in / c_in) / c_out + 0.1

    loss = objective.losses(off_by_a_tenth, Batch(x0, space), objective.path, g)
    torch.testing.assert_close(loss, torch.full((4,), 0.01, dtype=torch.float32), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("sigma_data", [1.0, 0.5])
def test_edm_min_snr_weighs_the_x0_error_by_min_snr_gamma(sigma_data):
    """``weighting=min_snr``: the error of D weighted by min(1 / sigma^2, gamma) in place of EDM's lambda; at
    sigma_data 1 that is lambda times v-prediction's min-SNR factor (F is then a v-prediction)."""
    space = DenseSpace((6, 3))
    x0 = torch.randn(6, 3, generator=torch.Generator().manual_seed(6)) * sigma_data
    t = torch.tensor([0.05, 0.2, 0.35, 0.5, 0.7, 0.95], dtype=torch.float64)
    path = EDMSchedule()
    sigma = path.sigma(t)
    assert (sigma**-2 > 5).any() and (sigma**-2 < 5).any()  # both sides of the clip

    def net(x_in, tt):  # a fixed, imperfect network
        return 0.3 * x_in + 0.1

    def losses(**weighting):
        objective = EDMObjective(sigma_data=sigma_data, **weighting)
        return objective.losses(net, Batch(x0, space), path, torch.Generator().manual_seed(7), t=t)

    uniform, min_snr = losses(), losses(weighting="min_snr", gamma=5.0)
    lam = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
    ratio = torch.minimum(sigma**-2, torch.tensor(5.0, dtype=torch.float64)) / lam
    torch.testing.assert_close(min_snr / uniform, ratio.float(), rtol=1e-5, atol=0)
    if sigma_data == 1.0:
        torch.testing.assert_close(ratio, loss_weight("v", "min_snr", sigma**-2, 5.0))


def test_flow_min_snr_weighs_the_implied_x0_error_by_min_snr_gamma():
    """``weighting=min_snr`` on the straight path: min(SNR, gamma) times the squared error of x0 = x_t - t v."""
    space, x0 = DenseSpace((5, 4)), torch.randn(5, 4, generator=torch.Generator().manual_seed(8))
    t = torch.tensor([0.02, 0.2, 0.5, 0.8, 0.99])
    seen = {}

    def net(x, tt):
        seen["x"] = x
        return 0.5 * x

    objective = FlowObjective(weighting="min_snr", gamma=2.0)
    loss = objective.losses(net, Batch(x0, space), FlowSchedule(), torch.Generator().manual_seed(9), t=t)
    x0_hat = seen["x"] - t[:, None] * net(seen["x"], t)
    snr = ((1 - t) / t) ** 2
    torch.testing.assert_close(loss, snr.clamp(max=2.0) * ((x0_hat - x0) ** 2).mean(1), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("cls", [EDMObjective, FlowObjective])
def test_a_weighting_or_gamma_out_of_range_is_named(cls):
    assert cls(weighting="min_snr").gamma == 5.0
    with pytest.raises(KeyError, match="objective.weighting 'snr'"):
        cls(weighting="snr")
    for gamma in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=f"objective.gamma={gamma}"):
            cls(weighting="min_snr", gamma=gamma)


def test_a_recipes_weighting_carries_over_to_the_objective_named_on_the_command_line():
    """``objective.name=edm`` on a recipe with ``weighting: min_snr`` keeps the weighting (EDM and flow take it) and
    leaves out what the new objective does not take (VP's ``prediction``)."""
    for name in ("edm", "flow"):
        cfg = {"objective": {"name": name, "prediction": "v", "weighting": "min_snr", "gamma": 3.0}}
        out, dropped = retarget_plugins(cfg, [f"objective.name={name}"])
        assert out["objective"] == {"name": name, "weighting": "min_snr", "gamma": 3.0}
        assert dropped == ["objective.prediction=v"]


def test_objectives_are_found_by_name_with_their_options():
    assert isinstance(build_objective_from({"name": "flow", "time": "logit_normal"}), FlowObjective)
    edm = build_objective_from({"name": "edm", "sigma_data": 1.0})
    assert isinstance(edm, EDMObjective) and edm.sampling_schedule(make_schedule("cosine", 10)) is edm.path
    with pytest.raises(KeyError, match="sigma_dat"):
        build_objective_from({"name": "edm", "sigma_dat": 1.0})
    with pytest.raises(ValueError, match="objective.precond='v' is not one of edm, x0, eps"):
        build_objective_from({"name": "edm", "precond": "v"})


def test_an_edm_checkpoint_resumes_only_with_its_own_preconditioning_and_sigma_data():
    """F means another thing under another ``precond`` or ``sigma_data``: resuming or sampling it so is refused."""
    old = {"domain": {"name": "d"}, "model": {}, "schedule": {}, "objective": {"name": "edm", "sigma_data": 1.0}}
    check_compatible(old, {**old, "objective": {"name": "edm", "sigma_data": 1.0, "precond": "edm"}}, "ckpt")
    with pytest.raises(IncompatibleCheckpointError, match="objective.precond: checkpoint 'edm' vs recipe 'x0'"):
        check_compatible(old, {**old, "objective": {"name": "edm", "sigma_data": 1.0, "precond": "x0"}}, "ckpt")
    with pytest.raises(IncompatibleCheckpointError, match="objective.sigma_data: checkpoint 1.0 vs recipe 0.5"):
        check_compatible(old, {**old, "objective": {"name": "edm"}}, "ckpt")


def test_a_flow_denoiser_refuses_a_vp_schedule():
    with pytest.raises(ValueError, match="sampling_schedule"):
        FlowObjective().denoiser(lambda x, t: x, make_schedule("cosine", 100), DenseSpace((1, 1)))
    with pytest.raises(ValueError, match="sampling_schedule"):
        EDMObjective().denoiser(lambda x, t: x, FlowSchedule(), DenseSpace((1, 1)))


# ------------------------------------------------------------------- k-diffusion
@pytest.fixture
def kdiffusion(monkeypatch):
    """k-diffusion's sampling module, read from its installed files with a stand-in for its utils: its package
    imports torchvision, wandb and CLIP at the top, none of which its samplers use."""
    path = importlib.metadata.distribution("k-diffusion").locate_file("k_diffusion/sampling.py")
    package, utils = types.ModuleType("kdiffusion_oracle"), types.ModuleType("kdiffusion_oracle.utils")
    package.__path__ = []
    utils.append_dims = lambda x, n: x[(...,) + (None,) * (n - x.ndim)]
    monkeypatch.setitem(sys.modules, "kdiffusion_oracle", package)
    monkeypatch.setitem(sys.modules, "kdiffusion_oracle.utils", utils)
    spec = importlib.util.spec_from_file_location("kdiffusion_oracle.sampling", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_karras_grid_matches_k_diffusion(kdiffusion):
    ours = karras_sigmas(18, 0.002, 80.0, 7.0)
    theirs = kdiffusion.get_sigmas_karras(18, 0.002, 80.0, 7.0).double()
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
    schedule = EDMSchedule()
    torch.testing.assert_close(schedule.sigma(sigma_grid(18, schedule)), ours, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("path", ["edm", "vp-linear", "flow"])
@pytest.mark.parametrize("name", ["euler", "heun"])
def test_euler_and_heun_match_k_diffusion(kdiffusion, path, name):
    """k-diffusion steps ``x = x0 + sigma eps`` with a denoiser D(x, sigma); polydiff steps the VP state of any path.
    Both driven by the exact denoiser on the same 12 noise levels and noise: the same samples."""
    schedule = SCHEDULES[path]()
    lo, hi = 0.01, 60.0
    sigmas = kdiffusion.get_sigmas_karras(12, lo, hi, 7.0).double()
    noise = torch.randn(256, 2, generator=torch.Generator().manual_seed(6), dtype=torch.float64)

    def ve_denoiser(x, sigma):  # EDM's D(x; sigma) for x = x0 + sigma eps
        s2 = sigma[:, None] ** 2
        return MU + VAR * (x - MU) / (VAR + s2)

    theirs = getattr(kdiffusion, f"sample_{name}")(ve_denoiser, noise * hi, sigmas, disable=True)
    ours = sample(name, exact_denoiser(schedule), noise, schedule, 12, grid="karras", sigma_min=lo, sigma_max=hi)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


# -------------------------------------------------------------------- bad input
def test_bad_sampler_values_are_named():
    schedule, den = FlowSchedule(), exact_denoiser(FlowSchedule())
    noise = torch.zeros(2, 1, dtype=torch.float64)
    with pytest.raises(ValueError, match="s_churn=-1"):
        sample("heun", den, noise, schedule, 5, s_churn=-1.0)
    with pytest.raises(ValueError, match="s_tmin=2.0 and sampler.s_tmax=1.0"):
        sample("heun", den, noise, schedule, 5, s_tmin=2.0, s_tmax=1.0)
    with pytest.raises(ValueError, match="sigma_min=5.0 and sampler.sigma_max=1.0"):
        sample("euler", den, noise, schedule, 5, sigma_min=5.0, sigma_max=1.0)
    with pytest.raises(ValueError, match="decrease strictly"):
        sample("euler", den, noise, schedule, torch.tensor([0.5, 0.7, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="signal is exactly zero"):
        sample("heun", den, noise, schedule, torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64))
    with pytest.raises(KeyError, match="sampler.grid 'karas'"):
        sample("heun", den, noise, schedule, 5, grid="karas")
    with pytest.raises(ValueError, match="rho=0"):
        sample("euler", den, noise, schedule, 5, rho=0.0)
    with pytest.raises(ValueError, match="sampler 'ode' does not hold a known part"):
        from polydiff.state import Known

        sample("ode", den, noise, schedule, 1, known=Known(noise, torch.ones_like(noise)))
    with pytest.raises(ValueError, match="sigma_max=-1"):
        EDMSchedule(sigma_max=-1.0)


# ----------------------------------------------------------------- molecules
def _ragged(sizes, gen, features=4):
    batch = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    space = RaggedSpace(batch, len(sizes), 3 + features, centered=(0, 1, 2))
    return space.randn(generator=gen, dtype=torch.float64), batch, space


def _orthogonal(gen, reflect):
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=gen, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    if (torch.det(q) < 0) != reflect:
        q[:, 0] = -q[:, 0]
    return q


@pytest.mark.parametrize("objective", [FlowObjective(), EDMObjective(sigma_data=1.0)], ids=["flow", "edm"])
@pytest.mark.parametrize("name", ["heun", "euler"])
def test_molecule_samples_are_e3_and_permutation_equivariant(objective, name):
    from domains.molecule import EGNN

    gen = torch.Generator().manual_seed(7)
    net = EGNN(4, hidden=16, layers=2).double().eval()
    x, batch, space = _ragged([5, 3], gen)
    schedule = objective.sampling_schedule(None)
    run = lambda x, batch, space: sample(
        name, objective.denoiser(net, schedule, space, {"batch": batch}), x, schedule, 3, space=space
    )
    with torch.no_grad():
        out = run(x, batch, space)
        for reflect in (False, True):
            q = _orthogonal(gen, reflect)
            out_rot = run(torch.cat([x[:, :3] @ q.T, x[:, 3:]], 1), batch, space)
            torch.testing.assert_close(out_rot[:, :3], out[:, :3] @ q.T, rtol=0, atol=1e-9)
            torch.testing.assert_close(out_rot[:, 3:], out[:, 3:], rtol=0, atol=1e-9)
        perm = torch.randperm(x.shape[0], generator=gen)
        pspace = RaggedSpace(batch[perm], 2, 7, centered=(0, 1, 2))
        torch.testing.assert_close(run(x[perm], batch[perm], pspace), out[perm], rtol=0, atol=1e-9)
        shifted = run(
            torch.cat([x[:, :3] + torch.tensor([3.0, -1.0, 2.0], dtype=torch.float64), x[:, 3:]], 1), batch, space
        )
        torch.testing.assert_close(shifted, out, rtol=0, atol=1e-9)  # a translation is projected away
    com = torch.zeros(2, 3, dtype=torch.float64).index_add_(0, batch, out[:, :3])
    assert com.abs().max() < 1e-10


def test_aligned_coupling_shortens_paths_and_keeps_the_subspace():
    gen = torch.Generator().manual_seed(8)
    x0, batch, space = _ragged([6, 5, 4], gen)
    x0[:, 3:] = torch.nn.functional.one_hot(torch.randint(0, 2, (15,), generator=gen), 4).double()
    eps = space.randn(generator=gen, dtype=torch.float64)
    paired = couple("aligned", x0, eps, space)
    assert ((paired - x0) ** 2).sum() < ((eps - x0) ** 2).sum()
    com = torch.zeros(3, 3, dtype=torch.float64).index_add_(0, batch, paired[:, :3])
    assert com.abs().max() < 1e-10
    for b in range(3):  # each molecule's noise is a rotation and a permutation of its own noise
        rows = batch == b
        torch.testing.assert_close(
            torch.linalg.norm(paired[rows][:, :3], dim=1).sort().values,
            torch.linalg.norm(eps[rows][:, :3], dim=1).sort().values,
        )
    q = _orthogonal(gen, False)
    torch.testing.assert_close(kabsch_rotation(eps[:6, :3], eps[:6, :3] @ q.T), q)  # a rotation is found exactly
    mirrored = kabsch_rotation(eps[:6, :3], eps[:6, :3] @ _orthogonal(gen, True).T)
    assert abs(float(torch.linalg.det(mirrored)) - 1) < 1e-9  # never a reflection: noise keeps its chirality


def test_minibatch_ot_pairs_closer_and_refuses_ragged_states():
    gen = torch.Generator().manual_seed(9)
    space = DenseSpace((64, 2))
    x0 = torch.randn(64, 2, generator=gen) + 3
    eps = torch.randn(64, 2, generator=gen)
    paired = couple("ot", x0, eps, space)
    assert ((paired - x0) ** 2).sum() < ((eps - x0) ** 2).sum()
    assert sorted(map(tuple, paired.tolist())) == sorted(map(tuple, eps.tolist()))  # a permutation of the draws
    _, _, ragged = _ragged([2, 3], gen)
    with pytest.raises(ValueError, match="coupling=aligned"):
        couple("ot", torch.zeros(5, 7), torch.zeros(5, 7), ragged)
    with pytest.raises(ValueError, match="coupling=ot"):
        couple("aligned", x0, eps, space)


# ------------------------------------------------------------------------ reflow
TINY = [*TINY_POINTS, "trainer.log_every=5", "sampler.steps=4"]


@pytest.fixture(scope="module")
def flow_teacher(tmp_path_factory):
    """A points model trained for a few steps by flow matching (the recipe's v-prediction left out)."""
    run = tmp_path_factory.mktemp("teacher") / "run"
    assert (
        cli(
            "train",
            "examples/points.yaml",
            "objective.name=flow",
            "trainer.max_steps=20",
            *TINY,
            f"hydra.run.dir={run}",
        )
        == ""
    )
    return run


def test_flow_runs_train_and_sample_with_every_sampler_family(flow_teacher, tmp_path):
    saved = torch.load(flow_teacher / "checkpoints" / "last.pt", weights_only=True)["config"]
    assert saved["objective"] == {"name": "flow"}  # objective.prediction=v of the recipe left out, by name
    for name, steps in (("heun", "3"), ("ddim", "4"), ("sde", "6")):
        out = tmp_path / name
        assert (
            cli(
                "sample",
                str(flow_teacher),
                "--n",
                "8",
                "--out",
                str(out),
                f"sampler.name={name}",
                f"sampler.steps={steps}",
            )
            == ""
        )
        x = torch.load(out / "samples.pt", weights_only=True)["x"]
        assert x.shape == (8, 2) and torch.isfinite(x).all()


def test_a_flow_run_whose_recipe_names_a_vp_option_resumes_with_the_same_command(flow_teacher, tmp_path):
    """The recipe's ``objective.prediction`` is left out for ``objective.name=flow`` when the run starts; running the
    same command again with more steps resumes instead of refusing the checkpoint over the left-out key."""
    import shutil

    from polydiff.checkpoint import load_checkpoint

    run = tmp_path / "run"
    shutil.copytree(flow_teacher, run)
    args = ["examples/points.yaml", "objective.name=flow", "trainer.max_steps=25", *TINY, f"hydra.run.dir={run}"]
    assert cli("train", *args) == ""
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    assert ckpt["step"] == 25 and ckpt["config"]["objective"] == {"name": "flow"}


def test_reflow_trains_a_student_from_the_teachers_weights_and_resumes(flow_teacher, tmp_path):
    import polydiff

    student = tmp_path / "student"
    assert (
        cli("reflow", str(flow_teacher), f"hydra.run.dir={student}", "trainer.max_steps=3", "objective.steps=2") == ""
    )
    ckpt = torch.load(student / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["step"] == 3
    assert ckpt["config"]["objective"]["name"] == "reflow"
    assert ckpt["config"]["objective"]["teacher"] == str(flow_teacher.resolve())
    assert ckpt["config"]["trainer"]["init"] == str(flow_teacher.resolve())
    # The same command with more steps goes on from the student's own checkpoint, not from the teacher.
    assert (
        cli("reflow", str(flow_teacher), f"hydra.run.dir={student}", "trainer.max_steps=5", "objective.steps=2") == ""
    )
    assert torch.load(student / "checkpoints" / "last.pt", weights_only=True)["step"] == 5
    records = [line for line in (student / "metrics.jsonl").read_text().splitlines() if '"train"' in line]
    assert records and '"step": 5' in records[-1]
    # A student samples without its teacher (the teacher is loaded for training only).
    moved = flow_teacher.with_name("moved")
    flow_teacher.rename(moved)
    try:
        parts, _ = polydiff.load_run(student)
        out = tmp_path / "drawn"
        assert cli("sample", str(student), "--n", "4", "--out", str(out), "sampler.name=euler", "sampler.steps=1") == ""
    finally:
        moved.rename(flow_teacher)
    assert type(parts.objective).__name__ == "ReflowObjective"


def test_a_fresh_run_starts_from_the_init_runs_ema_weights(flow_teacher, tmp_path):
    from polydiff.recipes import compose_recipe
    from polydiff.trainer import Trainer

    cfg = compose_recipe(
        "examples/points.yaml", ["objective.name=flow", "~objective.prediction", *TINY, f"trainer.init={flow_teacher}"]
    )
    trainer = Trainer(cfg, tmp_path / "run")
    ema = torch.load(flow_teacher / "checkpoints" / "last.pt", weights_only=True)["ema"]
    for key, value in trainer.net.state_dict().items():
        torch.testing.assert_close(value, ema[f"module.{key}"])
    other = compose_recipe("examples/points.yaml", [*TINY, "model.width=8", f"trainer.init={flow_teacher}"])
    with pytest.raises(ValueError, match=r"trainer.init=.* holds another network \(model: .*'width': 16"):
        Trainer(other, tmp_path / "other")


def test_reflow_pairs_each_noise_draw_with_the_teachers_sample_of_it():
    from polydiff.reflow import ReflowObjective

    objective = ReflowObjective(teacher="unused", steps=3)
    drawn = {}

    class FakeTeacher:
        def sample(self, z, space, cond, sampler, steps):
            drawn.update(z=z, sampler=sampler, steps=steps)
            return 2 * z + 1  # the "sample" this noise maps to

    objective._teacher = FakeTeacher()
    seen = {}

    def net(x, t):
        seen.update(x=x, t=t)
        return torch.zeros_like(x)

    space = DenseSpace((6, 3))
    objective.losses(net, Batch(torch.zeros(6, 3), space), FlowSchedule(), torch.Generator().manual_seed(0))
    z, t = drawn["z"], seen["t"][:, None]
    assert drawn["sampler"] == "heun" and drawn["steps"] == 3
    torch.testing.assert_close(seen["x"], (1 - t) * (2 * z + 1) + t * z)  # the pair, not the batch's data


def test_reflow_bad_inputs_are_named(flow_teacher, tmp_path):
    from polydiff.reflow import ReflowObjective

    assert "needs hydra.run.dir=NEW" in cli("reflow", str(flow_teacher))
    assert "no checkpoint at" in cli("reflow", str(tmp_path / "nope"), f"hydra.run.dir={tmp_path / 's'}")
    assert "give the new run a folder of its own" in cli("reflow", str(flow_teacher), f"hydra.run.dir={flow_teacher}")
    with pytest.raises(ValueError, match="objective.sampler='ddpm' is not deterministic"):
        ReflowObjective(teacher=str(flow_teacher), sampler="ddpm")
    with pytest.raises(ValueError, match="coupling does not apply to reflow"):
        ReflowObjective(teacher=str(flow_teacher), coupling="ot")
    with pytest.raises(FileNotFoundError, match="objective.teacher=.*nope: no such run"):
        ReflowObjective(teacher=str(tmp_path / "nope")).check_domain(None)
    with pytest.raises(ValueError, match="is a run of domain PointsDomain, not of this recipe's MoleculeDomain"):
        from domains.molecule import MoleculeDomain

        ReflowObjective(teacher=str(flow_teacher)).check_domain(MoleculeDomain.__new__(MoleculeDomain))
