"""Few-step students against closed forms and end to end: progressive and consistency distillation.

For Gaussian data ``x0 ~ N(MU, VAR)`` the teacher's denoiser, its probability-flow ODE and the consistency function
are known exactly, so a progressive student's target must reproduce two DDIM steps of the teacher, and the exact
consistency function must agree with itself one teacher step down the trajectory.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from common import MU, TINY_POINTS, VAR, cli, exact_denoiser

from polydiff import DenseSpace, RaggedSpace
from polydiff.build import load_run
from polydiff.consistency import ConsistencyObjective, consistency_scalings
from polydiff.distill import ProgressiveObjective, StudentGrid, progressive_target
from polydiff.edm import preconditioning
from polydiff.objectives import build_objective_from
from polydiff.paths import EDMSchedule, FlowSchedule
from polydiff.samplers import sample, timesteps
from polydiff.schedules import make_schedule
from polydiff.state import Batch, Prediction

torch.set_num_threads(1)


class FakeTeacher:
    """A teacher run reduced to what a student reads: its schedule, objective name and denoiser."""

    def __init__(self, schedule, denoiser_of, name="vp", path="teacher"):
        self.schedule, self.path, self._of = schedule, path, denoiser_of
        self.config = {"objective": {"name": name}}
        self.parts = SimpleNamespace(domain=SimpleNamespace(guidance_keys=("label",)))

    def denoiser(self, space, cond, device):
        return self._of(space, cond)


def _student(cls, base, den, **options):
    objective = cls(teacher="teacher", **options)
    objective._teacher = FakeTeacher(base, lambda space, cond: den)
    return objective, objective.sampling_schedule(base)


# ------------------------------------------------------------------ progressive
def test_a_progressive_target_is_two_teacher_ddim_steps_in_one():
    base = make_schedule("cosine", 1000)
    den = exact_denoiser(base)
    objective, grid = _student(ProgressiveObjective, base, den, steps=4)
    assert isinstance(grid, StudentGrid) and grid.num_steps == 4
    teacher_grid = timesteps(8, 1000)  # the teacher's DDIM grid: its even points are the student's
    torch.testing.assert_close(grid.alpha_bar(timesteps(4, 4)), base.alpha_bar(teacher_grid[::2]), rtol=0, atol=0)

    space = DenseSpace((64, 1))
    z = torch.randn(64, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for k in (0, 2, 4, 6):  # from each student time, two teacher steps down
        times = teacher_grid[k : k + 3, None].expand(-1, 64)
        two = sample("ddim", den, z, base, times, space=space)  # the teacher's two explicit DDIM steps
        x_tilde = progressive_target(den, z, times, base, space)
        ab = base.alpha_bar(times[[0, 2]])  # one DDIM step of x~ from times[0] to times[2]
        one = ab[1].sqrt()[:, None] * x_tilde + (1 - ab[1]).sqrt()[:, None] * (
            (z - ab[0].sqrt()[:, None] * x_tilde) / (1 - ab[0]).sqrt()[:, None]
        )
        torch.testing.assert_close(one, two, rtol=0, atol=1e-9)


def test_a_one_round_student_reproduces_the_teachers_sampler_at_half_the_steps():
    base = make_schedule("cosine", 1000)
    den = exact_denoiser(base)
    objective, grid = _student(ProgressiveObjective, base, den, steps=4)
    teacher_grid = timesteps(8, 1000)
    space = DenseSpace((32, 1))

    def oracle(x, tb):  # the network that predicts exactly the v target (tb: the teacher's time, i / 4 here)
        k = 8 - 2 * (tb.double() * 4).round().long()
        times = torch.stack([teacher_grid[k], teacher_grid[k + 1], teacher_grid[k + 2]])
        ab = base.alpha_bar(times[0])[:, None].to(x.dtype)
        return (ab.sqrt() * x - progressive_target(den, x, times, base, space)) / (1 - ab).sqrt()

    noise = torch.randn(32, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    student = sample("ddim", objective.denoiser(oracle, grid, space), noise, grid, 4, space=space)
    teacher = sample("ddim", den, noise, base, 8, space=space)
    torch.testing.assert_close(student, teacher, rtol=0, atol=1e-8)

    batch = Batch(MU + math.sqrt(VAR) * torch.randn(32, 1, dtype=torch.float64), space)
    gen = torch.Generator().manual_seed(2)
    assert objective.losses(oracle, batch, grid, gen).max() < 1e-16  # the target is what the oracle predicts
    assert objective.losses(lambda x, t: torch.zeros_like(x), batch, grid, gen).mean() > 1e-2


# ------------------------------------------------------------------ consistency
def _exact_consistency(grid, sigma_min):
    """The network whose consistency function is the exact one: the ODE's state at ``sigma_min``."""

    def net(x, tb):
        ab = grid.alpha_bar(_student_time(grid, tb)).to(x.dtype)[:, None]
        sigma = ((1 - ab) / ab).sqrt()
        y = x / ab.sqrt()
        exact = MU + (y - MU) * math.sqrt(VAR + sigma_min**2) / (VAR + sigma**2).sqrt()
        c_skip, c_out = consistency_scalings(sigma, sigma_min, 1.0)
        return torch.where(c_out > 0, -(exact - c_skip * y) / c_out.clamp(min=1e-30), torch.zeros_like(x))

    return net


def _student_time(grid, tb):
    """The student time ``i / N`` of the teacher time ``tb`` of a grid point."""
    i = (grid.base_times.to(tb.device)[None, :] - tb.double()[:, None]).abs().argmin(dim=1)
    return i.double() / grid.num_steps


def test_the_consistency_function_holds_its_boundary_and_agrees_along_the_teachers_trajectory():
    base = make_schedule("cosine", 1000)
    den = exact_denoiser(base)
    heun, grid = _student(ConsistencyObjective, base, den, steps=40, solver="heun")
    ddim, _ = _student(ConsistencyObjective, base, den, steps=40, solver="ddim")
    sigma_min = math.sqrt((1 - float(grid.alpha_bar_table[1])) / float(grid.alpha_bar_table[1]))
    space = DenseSpace((256, 1))
    x = torch.randn(256, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(3))

    # f(x, t_1) = x in EDM's coordinates (x / alpha here), whatever the network says.
    t1 = torch.full((256,), 1 / 40, dtype=torch.float64)
    f = heun.denoiser(lambda x, t: torch.randn_like(x), grid, space)(x, t1).x0
    torch.testing.assert_close(f, x / grid.alpha_bar(t1).sqrt()[:, None], rtol=0, atol=1e-12)

    # With the exact teacher, the exact consistency function's target one ODE step down agrees with it.
    net = _exact_consistency(grid, sigma_min)
    batch = Batch(MU + math.sqrt(VAR) * torch.randn(256, 1, dtype=torch.float64), space)
    heun_loss = heun.losses(net, batch, grid, torch.Generator().manual_seed(4))
    ddim_loss = ddim.losses(net, batch, grid, torch.Generator().manual_seed(4))
    assert heun_loss.max() < 1e-5 and 3 * heun_loss.mean() < ddim_loss.mean()  # Heun is second order, DDIM first
    wrong = lambda x, t: 1.1 * net(x, t)  # noqa: E731
    assert heun.losses(wrong, batch, grid, torch.Generator().manual_seed(4)).mean() > 100 * heun_loss.mean()

    # Sampled in one or two steps, the exact student returns the data law (up to sigma_min's noise).
    noise = torch.randn(20000, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    big = DenseSpace((20000, 1))
    for steps in (1, 2):
        out = sample(
            "consistency", heun.denoiser(net, grid, big), noise, grid, steps, space=big, generator=torch.Generator()
        )
        assert abs(float(out.mean()) - MU) < 0.02 and abs(float(out.var()) - VAR - sigma_min**2) < 0.02


def test_the_consistency_target_is_the_ema_network_when_the_trainer_gives_it():
    base = make_schedule("cosine", 100)
    objective, grid = _student(ConsistencyObjective, base, exact_denoiser(base), steps=6)
    seen = []
    target = lambda x, t: seen.append("target") or torch.zeros_like(x)  # noqa: E731
    objective.use_target(target)
    space = DenseSpace((8, 1))
    objective.losses(lambda x, t: seen.append("online") or x, Batch(torch.zeros(8, 1), space), grid)
    assert seen == ["target", "online"]


def test_a_guided_teacher_is_distilled_at_its_fixed_scale():
    base = make_schedule("cosine", 100)

    def denoiser_of(space, cond):  # x0 = 1 + the label (0 for the null label -1): the guided x0 is u + s (c - u)
        x0 = (cond["label"].double() + 1)[:, None]
        return lambda x, t: Prediction(x0.expand_as(x), torch.zeros_like(x))

    objective = ProgressiveObjective(teacher="teacher", guidance_scale=3.0)
    objective._teacher = FakeTeacher(base, denoiser_of)
    space, label = DenseSpace((3, 1)), torch.tensor([2, -1, 0])
    den = objective.teacher_denoiser(space, {"label": label}, torch.device("cpu"))
    x0 = den(torch.zeros(3, 1, dtype=torch.float64), torch.full((3,), 0.5)).x0
    torch.testing.assert_close(x0[:, 0], torch.tensor([0 + 3 * 3.0, 0.0, 3 * 1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="guidance_scale=3.0 needs a conditional teacher"):
        objective.teacher_denoiser(space, {}, torch.device("cpu"))


# ------------------------------------------------------------------ flow and EDM teachers
def _oracle(objective, grid, space, want):
    """The network whose student estimate of ``x0`` is ``want(x, t)`` (``x`` the VP state, ``t`` the student time):
    the student's ``x0`` is affine in the network's output, so two constant networks give its offset and slope."""
    name, path = objective.base["name"], grid.base

    def to_vp(inp, tb):  # the VP state from what the base objective feeds its network
        if name == "vp":
            return inp
        scale = path.scale(tb).to(inp.dtype)[:, None]
        if name == "flow":
            return inp / scale
        c_in = preconditioning(path.sigma(tb), objective.base_objective.sigma_data)[2].to(inp.dtype)[:, None]
        return inp / (c_in * scale)

    def net(inp, tb):
        x, t = to_vp(inp, tb), _student_time(grid, tb)
        at = [objective.student_denoiser(lambda i, s: torch.full_like(i, c), grid, space, {})(x, t).x0 for c in (0, 1)]
        return (want(x, t) - at[0]) / (at[1] - at[0])

    return net


TEACHERS = [{"name": "flow"}, {"name": "edm"}, {"name": "vp", "prediction": "x0"}, {"name": "vp", "prediction": "v"}]


@pytest.mark.parametrize("trained", TEACHERS, ids=lambda t: "-".join(t.values()))
def test_a_student_starts_as_its_teacher_and_reproduces_it_at_half_the_steps(trained):
    path = build_objective_from(trained).sampling_schedule(make_schedule("cosine", 1000))
    den = exact_denoiser(path)  # the teacher, in the VP coordinates of its own path
    objective = ProgressiveObjective(teacher="teacher", steps=4, base=trained)
    objective._teacher = FakeTeacher(path, lambda space, cond: den, name=trained["name"])
    grid = objective.sampling_schedule(make_schedule("cosine", 1000))  # flow and EDM do not read it
    teacher_grid = timesteps(8, path.num_steps)
    assert isinstance(grid.base, type(path))
    torch.testing.assert_close(grid.alpha_bar(timesteps(4, 4)), path.alpha_bar(teacher_grid[::2]), rtol=0, atol=0)

    # With the teacher's weights the student is the teacher's denoiser (a velocity, EDM's D, v or x0) at each time.
    space = DenseSpace((32, 1))
    x = torch.randn(32, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    net = lambda x, t: torch.sin(3 * x) * (1 + t[:, None])  # noqa: E731
    for i in range(1, 5):
        t = torch.full((32,), i / 4, dtype=torch.float64)
        mine = objective.denoiser(net, grid, space)(x, t)
        theirs = objective.base_objective.denoiser(net, path, space)(x, grid.base_time(t))
        torch.testing.assert_close(mine.x0, theirs.x0, rtol=0, atol=0)

    def target(x, t):  # two of the teacher's DDIM (for flow: Euler) steps from student time t, as one
        k = 8 - 2 * (t.double() * 4).round().long()
        return progressive_target(
            den, x, torch.stack([teacher_grid[k], teacher_grid[k + 1], teacher_grid[k + 2]]), path, space
        )

    oracle = _oracle(objective, grid, space, target)
    noise = torch.randn(32, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    student = sample("ddim", objective.denoiser(oracle, grid, space), noise, grid, 4, space=space)
    torch.testing.assert_close(student, sample("ddim", den, noise, path, 8, space=space), rtol=0, atol=1e-8)
    batch = Batch(MU + math.sqrt(VAR) * torch.randn(32, 1, dtype=torch.float64), space)
    gen = torch.Generator().manual_seed(8)
    assert objective.losses(oracle, batch, grid, gen).max() < 1e-14
    assert objective.losses(net, batch, grid, gen).mean() > 1e-2


@pytest.mark.parametrize("name", ["flow", "edm"])
def test_a_consistency_student_of_a_flow_or_edm_teacher_agrees_along_its_trajectory(name):
    path = build_objective_from({"name": name}).sampling_schedule(make_schedule("cosine", 1000))
    den = exact_denoiser(path)
    objective = ConsistencyObjective(teacher="teacher", steps=40, base={"name": name})
    objective._teacher = FakeTeacher(path, lambda space, cond: den, name=name)
    grid = objective.sampling_schedule(make_schedule("cosine", 1000))
    sigma = ((1 - grid.alpha_bar_table[1:]) / grid.alpha_bar_table[1:]).sqrt()
    assert abs(float(sigma[-1]) - 80) < 1e-6 and isinstance(grid.base, type(path))  # EDM's top level
    sigma_min, space = float(sigma[0]), DenseSpace((256, 1))
    x = torch.randn(256, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    t1 = torch.full((256,), 1 / 40, dtype=torch.float64)
    f = objective.denoiser(lambda x, t: torch.randn_like(x), grid, space)(x, t1).x0
    torch.testing.assert_close(f, x / grid.alpha_bar(t1).sqrt()[:, None], rtol=0, atol=1e-9)  # the boundary

    def exact(x, t):  # the student's x0 whose consistency function is the ODE's state at sigma_min
        ab = grid.alpha_bar(t).to(x.dtype)[:, None]
        sig, y = ((1 - ab) / ab).sqrt(), x / ab.sqrt()
        f = MU + (y - MU) * math.sqrt(VAR + sigma_min**2) / (VAR + sig**2).sqrt()
        (c_skip, c_out), (d_skip, d_out) = (consistency_scalings(sig, m, 1.0) for m in (sigma_min, 0.0))
        return d_skip * y + d_out * torch.where(c_out > 0, (f - c_skip * y) / c_out.clamp(min=1e-30), 0 * y)

    net = _oracle(objective, grid, space, exact)
    batch = Batch(MU + math.sqrt(VAR) * torch.randn(256, 1, dtype=torch.float64), space)
    loss = objective.losses(net, batch, grid, torch.Generator().manual_seed(4))
    assert loss.max() < 1e-5
    wrong = lambda x, t: 1.1 * net(x, t)  # noqa: E731
    assert objective.losses(wrong, batch, grid, torch.Generator().manual_seed(4)).mean() > 100 * loss.mean()
    noise = torch.randn(20000, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    big = DenseSpace((20000, 1))
    out = sample(
        "consistency", objective.denoiser(net, grid, big), noise, grid, 1, space=big, generator=torch.Generator()
    )
    assert abs(float(out.mean()) - MU) < 0.02 and abs(float(out.var()) - VAR - sigma_min**2) < 0.02


# ------------------------------------------------------------------ molecules
def _orthogonal(gen, reflect):
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=gen, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    if (torch.det(q) < 0) != reflect:
        q[:, 0] = -q[:, 0]
    return q


@pytest.mark.parametrize("kind", ["progressive", "consistency"])
@pytest.mark.parametrize("teacher_objective", [{"name": "vp", "prediction": "v"}, {"name": "flow"}])
def test_molecule_students_are_equivariant_and_keep_zero_centre_of_mass(kind, teacher_objective):
    from domains.molecule import EGNN

    gen = torch.Generator().manual_seed(7)
    recipe = make_schedule("cosine", 1000)
    trained = build_objective_from(teacher_objective)
    base = trained.sampling_schedule(recipe)
    teacher_net, net = EGNN(4, hidden=16, layers=2).double().eval(), EGNN(4, hidden=16, layers=2).double().eval()
    cls, name, steps = (ProgressiveObjective, "ddim", 4) if kind == "progressive" else (ConsistencyObjective, kind, 1)
    objective = cls(teacher="teacher", steps=4, base=teacher_objective)
    objective._teacher = FakeTeacher(
        base, lambda space, cond: trained.denoiser(teacher_net, base, space, cond), name=teacher_objective["name"]
    )
    grid = objective.sampling_schedule(recipe)
    sizes = [5, 3]
    batch = torch.repeat_interleave(torch.arange(2), torch.tensor(sizes))
    space = RaggedSpace(batch, 2, 7, centered=(0, 1, 2))
    x = space.randn(generator=gen, dtype=torch.float64)
    run = lambda x: sample(  # noqa: E731
        name, objective.denoiser(net, grid, space, {"batch": batch}), x, grid, steps, space=space
    )
    with torch.no_grad():
        out = run(x)
        for reflect in (False, True):
            q = _orthogonal(gen, reflect)
            out_rot = run(torch.cat([x[:, :3] @ q.T, x[:, 3:]], 1))
            torch.testing.assert_close(out_rot[:, :3], out[:, :3] @ q.T, rtol=0, atol=1e-9)
            torch.testing.assert_close(out_rot[:, 3:], out[:, 3:], rtol=0, atol=1e-9)
        com = torch.zeros(2, 3, dtype=torch.float64).index_add_(0, batch, out[:, :3])
        assert com.abs().max() < 1e-10
        # Training on a ragged batch: the teacher's steps stay centred and the loss is per molecule.
        data = Batch(space.randn(generator=gen, dtype=torch.float64), space, {"batch": batch})
        losses = objective.losses(net, data, grid, gen)
    assert losses.shape == (2,) and torch.isfinite(losses).all()


# ------------------------------------------------------------------ end to end
TINY = [*TINY_POINTS, "trainer.log_every=1"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A v-prediction points model trained for a few steps."""
    run = tmp_path_factory.mktemp("teacher") / "run"
    assert cli("train", "examples/points.yaml", "trainer.max_steps=10", *TINY, f"hydra.run.dir={run}") == ""
    return run


def _ckpt(run):
    return torch.load(run / "checkpoints" / "last.pt", weights_only=True)


def test_progressive_distill_runs_a_round_per_run_resumes_and_samples(teacher, tmp_path):
    student = tmp_path / "student"
    cmd = ["distill", str(teacher), "--method", "progressive", "--steps", "2", "--teacher-steps", "8"]
    assert cli(*cmd, f"hydra.run.dir={student}", "trainer.max_steps=3", *TINY) == ""
    first, last = _ckpt(student / "rounds" / "steps-4"), _ckpt(student)
    base = _ckpt(teacher)["config"]["objective"]  # the path every round is read on: the first teacher's
    assert first["config"]["objective"] == {
        "name": "progressive",
        "steps": 4,
        "guidance_scale": 1.0,
        "base": base,
        "teacher": str(teacher.resolve()),
    }
    assert last["config"]["objective"]["teacher"] == str((student / "rounds" / "steps-4").resolve())
    assert last["config"]["objective"]["base"] == base
    assert last["config"]["sampler"]["name"] == "ddim" and last["config"]["sampler"]["steps"] == 2
    assert last["step"] == 3
    # A higher trainer.max_steps trains every round on from its own checkpoint; the same command again leaves a
    # finished round as it is.
    assert cli(*cmd, f"hydra.run.dir={student}", "trainer.max_steps=5", *TINY) == ""
    assert _ckpt(student / "rounds" / "steps-4")["step"] == 5 and _ckpt(student)["step"] == 5
    kept = (student / "rounds" / "steps-4" / "metrics.jsonl").read_text()
    assert cli(*cmd, f"hydra.run.dir={student}", "trainer.max_steps=5", *TINY) == ""
    assert (student / "rounds" / "steps-4" / "metrics.jsonl").read_text() == kept
    # A student samples without its teacher, at its own steps; more steps than it learnt are refused.
    moved = teacher.with_name("moved")
    teacher.rename(moved)
    try:
        assert cli("sample", str(student), "--n", "4", "--out", str(tmp_path / "drawn")) == ""
        assert "sampler.steps must be in 1..2" in cli(
            "sample", str(student), "--n", "4", "--out", str(tmp_path / "more"), "sampler.steps=4"
        )
    finally:
        moved.rename(teacher)
    x = torch.load(tmp_path / "drawn" / "samples.pt", weights_only=True)["x"]
    assert x.shape == (4, 2) and torch.isfinite(x).all()


def test_consistency_distill_resumes_exactly_and_samples_in_one_step(teacher, tmp_path):
    cmd = ["distill", str(teacher), "--method", "consistency", "objective.steps=8", *TINY]
    whole, halves = tmp_path / "whole", tmp_path / "halves"
    assert cli(*cmd, f"hydra.run.dir={whole}", "trainer.max_steps=4") == ""
    assert cli(*cmd, f"hydra.run.dir={halves}", "trainer.max_steps=2") == ""
    assert cli(*cmd, f"hydra.run.dir={halves}", "trainer.max_steps=4") == ""
    a, b = _ckpt(whole), _ckpt(halves)
    assert a["config"]["sampler"]["name"] == "consistency" and a["config"]["objective"]["name"] == "consistency"
    for key in ("model", "ema"):  # the EMA is the target network: a resumed run goes on identically
        for name, value in a[key].items():
            assert torch.equal(value, b[key][name]), (key, name)
    assert cli("sample", str(whole), "--n", "4", "--out", str(tmp_path / "one")) == ""
    assert "sampler.steps must be in 1..8" in cli(
        "sample", str(whole), "--n", "4", "--out", str(tmp_path / "nine"), "sampler.steps=9"
    )


@pytest.mark.parametrize("name,method", [("flow", "progressive"), ("edm", "consistency")])
def test_flow_and_edm_runs_are_distilled_and_their_students_sample_on_their_path(name, method, tmp_path):
    run, student = tmp_path / name, tmp_path / "student"
    train = ["examples/points.yaml", f"objective.name={name}", "trainer.max_steps=6", f"hydra.run.dir={run}"]
    assert cli("train", *train, *TINY) == ""
    steps = ["--steps", "2", "--teacher-steps", "4"] if method == "progressive" else ["objective.steps=8"]
    assert (
        cli("distill", str(run), "--method", method, *steps, f"hydra.run.dir={student}", "trainer.max_steps=2", *TINY)
        == ""
    )
    saved = _ckpt(student)["config"]["objective"]
    assert saved["name"] == method and saved["base"] == _ckpt(run)["config"]["objective"]
    grid = load_run(student)[0].schedule  # read on the teacher's path without the teacher
    assert isinstance(grid, StudentGrid) and isinstance(grid.base, {"flow": FlowSchedule, "edm": EDMSchedule}[name])
    assert cli("sample", str(student), "--n", "4", "--out", str(tmp_path / "drawn")) == ""
    x = torch.load(tmp_path / "drawn" / "samples.pt", weights_only=True)["x"]
    assert x.shape == (4, 2) and torch.isfinite(x).all()


def test_distill_bad_inputs_are_named(teacher, tmp_path):
    out = f"hydra.run.dir={tmp_path / 's'}"
    assert "distill needs --method" in cli("distill", str(teacher), out)
    assert "no checkpoint at" in cli("distill", str(tmp_path / "nope"), "--method", "consistency", out)
    assert "--teacher-steps 48 must be --steps 4 doubled" in cli(
        "distill", str(teacher), "--method", "progressive", "--teacher-steps", "48", out
    )
    assert "needs a conditional teacher" in cli(
        "distill", str(teacher), "--method", "consistency", "--guidance", "3", out, "trainer.max_steps=1", *TINY
    )
    with pytest.raises(FileNotFoundError, match="objective.teacher=.*nope: no such run"):
        ConsistencyObjective(teacher=str(tmp_path / "nope")).check_domain(None)
    from domains.molecule import MoleculeDomain

    with pytest.raises(ValueError, match="is a run of domain PointsDomain, not of this recipe's MoleculeDomain"):
        ProgressiveObjective(teacher=str(teacher)).check_domain(MoleculeDomain.__new__(MoleculeDomain))
    base = make_schedule("cosine", 1000)
    for student, name in ((ProgressiveObjective, "consistency"), (ConsistencyObjective, "progressive")):
        with pytest.raises(ValueError, match=f"trained with objective '{name}'.*distil a run trained with one"):
            student(teacher="t").check_teacher(FakeTeacher(base, None, name=name))
    with pytest.raises(ValueError, match="objective.base.name='consistency': a student is read on the path of one"):
        ProgressiveObjective(teacher="t", base={"name": "consistency"})
    round_teacher = FakeTeacher(ProgressiveObjective(steps=8).sampling_schedule(base), None, name="progressive")
    with pytest.raises(ValueError, match="objective.steps=2 halves a teacher of 4 steps.*set objective.steps=4"):
        ProgressiveObjective(teacher="t", steps=2).check_teacher(round_teacher)
    with pytest.raises(ValueError, match="has 50 trained steps: start from at most 50 .polydiff distill"):
        ProgressiveObjective(teacher="t", steps=32).check_teacher(FakeTeacher(make_schedule("cosine", 50), None))
    with pytest.raises(ValueError, match="objective.steps=1: consistency distillation needs at least 2"):
        ConsistencyObjective(teacher="t", steps=1)
    with pytest.raises(ValueError, match="objective.solver='euler'"):
        ConsistencyObjective(teacher="t", solver="euler")


# Each rank saves its student's final weights to DUMP/rank{N}-{steps}.pt (one file per progressive round).
DDP_DISTILL = """
import sys
import torch
from polydiff import trainer
from polydiff.cli import main

dump = sys.argv.pop(1)
real_fit = trainer.Trainer.fit

def fit(self):
    result = real_fit(self)
    steps = self.parts.schedule.num_steps
    torch.save({"model": self.net.state_dict(), "world": self.world_size}, f"{dump}/rank{self.rank}-{steps}.pt")
    return result

trainer.Trainer.fit = fit
main()
"""


@pytest.mark.parametrize("method", ["progressive", "consistency"])
def test_distill_runs_under_ddp_with_two_processes(teacher, method, tmp_path):
    """``torchrun --nproc_per_node 2 polydiff distill``: every round trains over gloo, the ranks stay identical."""
    root = Path(__file__).resolve().parents[1]
    script, student = tmp_path / "launch.py", tmp_path / "student"
    script.write_text(DDP_DISTILL)
    how = ["--steps", "2", "--teacher-steps", "8"] if method == "progressive" else ["objective.steps=8"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", str(script)]
    cmd += [str(tmp_path), "distill", str(teacher), "--method", method, *how, f"hydra.run.dir={student}"]
    cmd += ["trainer.max_steps=4", *TINY]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rounds = [(4, student / "rounds" / "steps-4"), (2, student)] if method == "progressive" else [(8, student)]
    for steps, folder in rounds:
        ckpt = _ckpt(folder)
        records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        assert ckpt["step"] == 4 and {r["world_size"] for r in records if r["kind"] == "train"} == {2}
        for rank in (0, 1):
            saved = torch.load(tmp_path / f"rank{rank}-{steps}.pt", weights_only=True)
            assert saved["world"] == 2
            for name, value in ckpt["model"].items():
                assert torch.equal(saved["model"][name], value), f"rank {rank}'s {name} is not the checkpoint's"
