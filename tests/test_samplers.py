"""Sampler maths against a closed form: for Gaussian data the optimal denoiser is known exactly.

For ``x0 ~ N(mu, Sigma)`` and ``x_t = a x0 + s eps``, ``E[x0 | x_t] = mu + a Sigma (a^2 Sigma +
s^2 I)^{-1} (x_t - a mu)``. Samplers driven by it must reproduce ``mu`` and ``Sigma``.
"""

import pytest
import torch

from polydiff import DenseSpace, RaggedSpace
from polydiff.guidance import classifier_free_guidance
from polydiff.objectives import Prediction
from polydiff.samplers import sample, sample_ddim, sample_ddpm, timesteps
from polydiff.schedules import make_schedule

MU = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
_L = torch.tensor([[1.0, 0, 0], [0.5, 0.7, 0], [-0.3, 0.2, 0.4]], dtype=torch.float64)
SIGMA = _L @ _L.T
EVALS, EVECS = torch.linalg.eigh(SIGMA)


def gaussian_denoiser(schedule, space, mu=MU):
    """The exact posterior-mean denoiser for N(mu, SIGMA) rows, broadcast through ``space``."""

    def denoise(x, t):
        a, s = schedule.alpha_sigma(t, dtype=torch.float64)
        a, s = space.expand(a), space.expand(s)  # [B|N, 1]
        gain = a * EVALS / (a**2 * EVALS + s**2)  # [., D] in the eigenbasis
        x0 = mu + ((x - a * mu) @ EVECS * gain) @ EVECS.T
        return Prediction(x0, (x - a * x0) / s)

    return denoise


CASES = [("ddpm", 1000, {}), ("ddim", 50, {}), ("dpmpp_2m", 20, {})]


def _check_moments(x, mean_tol, cov_tol):
    assert torch.isfinite(x).all()
    assert (x.mean(0) - MU).abs().max() < mean_tol
    assert (torch.cov(x.T) - SIGMA).abs().max() < cov_tol


@pytest.mark.parametrize("name,steps,opts", CASES)
def test_dense_gaussian_moments(name, steps, opts):
    schedule = make_schedule("cosine", 1000)
    n = 20_000
    space = DenseSpace((n, 3))
    g = torch.Generator().manual_seed(0)
    noise = space.randn(g, dtype=torch.float64)
    x = sample(name, gaussian_denoiser(schedule, space), noise, schedule, steps, space=space, generator=g, **opts)
    # Sampling error of the moments at n = 20k is ~0.01-0.02; the rest is discretisation.
    _check_moments(x, mean_tol=0.04, cov_tol=0.08)


@pytest.mark.parametrize("name,steps,opts", CASES)
def test_ragged_gaussian_moments_with_per_sample_grids(name, steps, opts):
    """Rows grouped into samples of 1..9 rows; each sample on its own time grid."""
    schedule = make_schedule("linear", 1000)
    g = torch.Generator().manual_seed(1)
    sizes = torch.randint(1, 10, (3000,), generator=g)
    batch = torch.repeat_interleave(torch.arange(len(sizes)), sizes)
    space = RaggedSpace(batch, len(sizes), 3)
    grid = timesteps(steps, 1000)[:, None].repeat(1, len(sizes))  # [n + 1, B]
    # Half the samples start half a trained step lower (between grid points): a per-sample grid.
    grid[0, ::2] = grid[0, ::2] - 0.5 / 1000
    noise = space.randn(g, dtype=torch.float64)
    x = sample(name, gaussian_denoiser(schedule, space), noise, schedule, grid, space=space, generator=g, **opts)
    _check_moments(x, mean_tol=0.05, cov_tol=0.1)


def test_centered_subspace_noise_and_samples():
    """Zero centre of mass: noise, every step and the result stay in the subspace."""
    schedule = make_schedule("cosine", 1000)
    g = torch.Generator().manual_seed(2)
    sizes = torch.randint(2, 8, (4000,), generator=g)
    batch = torch.repeat_interleave(torch.arange(len(sizes)), sizes)
    space = RaggedSpace(batch, len(sizes), 4, centered=(0, 1, 2))
    noise = space.randn(g, dtype=torch.float64)
    com = space.segment_sum(noise[:, :3])
    assert com.abs().max() < 1e-10
    assert space.segment_sum(noise[:, 3:]).abs().max() > 1e-3  # the uncentred column keeps its per-sample mean

    var = 0.5  # x0: i.i.d. N(0, var) positions projected to zero mean; N(0, var) feature

    def denoise(x, t):
        a, s = schedule.alpha_sigma(t, dtype=torch.float64)
        a, s = space.expand(a), space.expand(s)
        x0 = a * var / (a**2 * var + s**2) * x
        return Prediction(x0, (x - a * x0) / s)

    seen = []
    x = sample_ddim(
        denoise,
        noise,
        schedule,
        200,
        space=space,
        callback=lambda d: seen.append(space.segment_sum(d["x"][:, :3]).abs().max()),
    )
    assert max(seen) < 1e-10
    # Per-coordinate variance in the subspace is var * (n - 1) / n.
    factor = ((sizes - 1) / sizes).double()[batch]
    assert abs(float((x[:, :3] ** 2 / factor[:, None]).mean()) - var) < 0.03
    assert abs(float((x[:, 3] ** 2).mean()) - var) < 0.03


def test_ddim_eta0_is_deterministic_and_eta1_matches_ddpm():
    schedule = make_schedule("cosine", 1000)
    space = DenseSpace((64, 3))
    den = gaussian_denoiser(schedule, space)
    noise = space.randn(torch.Generator().manual_seed(3), dtype=torch.float64)
    a = sample_ddim(den, noise, schedule, 25, generator=torch.Generator().manual_seed(4))
    b = sample_ddim(den, noise, schedule, 25, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    # eta = 1 is ancestral sampling with the posterior variance: same draws, same result.
    c = sample_ddim(den, noise, schedule, 25, eta=1.0, generator=torch.Generator().manual_seed(6))
    d = sample_ddpm(den, noise, schedule, 25, variance="small", generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(c, d, rtol=1e-9, atol=1e-9)
    assert not torch.allclose(a, c)


def test_generator_reproducibility():
    schedule = make_schedule("linear", 100)
    space = DenseSpace((16, 3))
    den = gaussian_denoiser(schedule, space)
    noise = space.randn(torch.Generator().manual_seed(0), dtype=torch.float64)
    runs = [sample_ddpm(den, noise, schedule, 100, generator=torch.Generator().manual_seed(9)) for _ in range(2)]
    assert torch.equal(*runs)


def test_spacings_start_where_documented():
    T = 1000
    trailing = timesteps(50, T, "trailing")
    assert trailing[0] == 1.0 and trailing[-1] == 0.0 and len(trailing) == 51
    leading = timesteps(50, T, "leading")
    assert leading[0] == pytest.approx(981 / T) and leading[-2] == pytest.approx(1 / T)
    linspace = timesteps(50, T, "linspace")
    assert linspace[0] == 1.0 and linspace[-2] == pytest.approx(1 / T)
    for grid in (trailing, leading, linspace):
        assert (grid[1:] < grid[:-1]).all()
    with pytest.raises(KeyError, match="spacing"):
        timesteps(10, T, "middle")
    with pytest.raises(ValueError, match="1..1000"):
        timesteps(2000, T)


def test_unknown_sampler_lists_known():
    schedule = make_schedule("linear", 10)
    with pytest.raises(KeyError, match="ddim"):
        sample("ddmi", None, torch.zeros(1, 3), schedule, 5)
    with pytest.raises(KeyError, match="temperature"):
        sample("ddim", None, torch.zeros(1, 3), schedule, 5, temperature=2.0)


def test_an_option_the_sampler_does_not_take_is_refused_not_dropped():
    """Options are the sampler's keyword arguments; another sampler's is named with the samplers that take it."""
    from polydiff.samplers import sampler_options

    schedule = make_schedule("linear", 10)
    with pytest.raises(KeyError, match=r"sampler.eta is not an option of sampler 'ddpm' \(samplers that take it: ddim"):
        sample("ddpm", None, torch.zeros(1, 3), schedule, 5, eta=0.5)
    assert sampler_options("ddpm") == {"variance": "small", "clip_x0": None, "spacing": "trailing"}
    assert sampler_options("ddim") == {"eta": 0.0, "clip_x0": None, "spacing": "trailing"}


def test_clip_x0_off_by_default_and_opt_in():
    """Data far outside [-1, 1] is reproduced unless clipping is asked for."""
    schedule = make_schedule("cosine", 1000)
    space = DenseSpace((4000, 3))
    far = MU * 10
    den = gaussian_denoiser(schedule, space, mu=far)
    noise = space.randn(torch.Generator().manual_seed(7), dtype=torch.float64)
    x = sample_ddim(den, noise, schedule, 50)
    assert (x.mean(0) - far).abs().max() < 0.1
    clipped = sample_ddim(den, noise, schedule, 50, clip_x0=1.0)
    assert clipped.abs().max() <= 1.0 + 1e-9


def test_cfg_scale_0_and_1_reduce_to_each_model():
    schedule = make_schedule("cosine", 1000)
    space = DenseSpace((256, 3))
    cond = gaussian_denoiser(schedule, space, mu=MU)
    uncond = gaussian_denoiser(schedule, space, mu=-MU)
    noise = space.randn(torch.Generator().manual_seed(8), dtype=torch.float64)
    run = lambda den: sample_ddim(den, noise, schedule, 20)
    torch.testing.assert_close(run(classifier_free_guidance(cond, uncond, 1.0, space)), run(cond))
    torch.testing.assert_close(run(classifier_free_guidance(cond, uncond, 0.0, space)), run(uncond))
    # Any scale is the affine mix of both predictions; rescale keeps eps consistent with x0.
    x = noise
    t = torch.full((256,), 0.5, dtype=torch.float64)
    guided = classifier_free_guidance(cond, uncond, 3.0, space, schedule, rescale=0.7)(x, t)
    a, s = schedule.alpha_sigma(t, dtype=torch.float64)
    torch.testing.assert_close(space.expand(a) * guided.x0 + space.expand(s) * guided.eps, x)
    plain = classifier_free_guidance(cond, uncond, 3.0, space)(x, t)
    torch.testing.assert_close(plain.x0, uncond(x, t).x0 + 3.0 * (cond(x, t).x0 - uncond(x, t).x0))


@pytest.mark.parametrize("stacked", [False, True])
def test_cfg_in_an_interval_guides_there_and_is_the_conditional_model_elsewhere(stacked):
    """Guidance in a limited interval of sigma / alpha (Kynkaenniemi et al. 2024): rows whose noise level is inside get
    the guided mix, the rest the conditional prediction exactly; a call with no row inside skips the unconditional
    model."""
    from polydiff.guidance import stacked_guidance

    schedule = make_schedule("cosine", 1000)
    space = DenseSpace((4, 3))
    cond = gaussian_denoiser(schedule, space, mu=MU)
    uncond = gaussian_denoiser(schedule, space, mu=-MU)
    calls = []

    def counted(x, t):
        calls.append(len(t))
        return uncond(x, t)

    def joint(x, t):  # the conditional rows first, as stacked_guidance lays out [x; x]
        rows = len(t) // 2
        c, u = cond(x[:rows], t[:rows]), uncond(x[rows:], t[rows:])
        return Prediction(torch.cat([c.x0, u.x0]), torch.cat([c.eps, u.eps]))

    def guided(interval):
        if stacked:
            return stacked_guidance(joint, 3.0, space, schedule, interval=interval)
        return classifier_free_guidance(cond, counted, 3.0, space, schedule, interval=interval)

    x = space.randn(torch.Generator().manual_seed(10), dtype=torch.float64)
    t = torch.tensor([0.05, 0.5, 0.9, 1.0], dtype=torch.float64)  # sigma / alpha about 0.08, 1.0, 6.4, 2e4
    full, part = guided(None)(x, t), guided([0.5, 10.0])(x, t)
    inside = torch.tensor([False, True, True, False])
    torch.testing.assert_close(part.x0[inside], full.x0[inside])
    torch.testing.assert_close(part.eps[inside], full.eps[inside])
    plain = cond(x, t)
    assert torch.equal(part.x0[~inside], plain.x0[~inside]) and torch.equal(part.eps[~inside], plain.eps[~inside])
    assert not torch.allclose(full.x0[~inside], plain.x0[~inside])
    if not stacked:
        calls.clear()
        out = guided([0.5, 10.0])(x, torch.full((4,), 0.01, dtype=torch.float64))
        assert not calls and torch.equal(out.x0, cond(x, torch.full((4,), 0.01, dtype=torch.float64)).x0)
    with pytest.raises(ValueError, match=r"guidance.interval=\[3.0, 1.0\] must be two numbers"):
        guided([3.0, 1.0])
    with pytest.raises(ValueError, match="needs the schedule"):
        classifier_free_guidance(cond, uncond, 3.0, space, None, interval=[0.0, 1.0])


def test_guidance_rescale_matches_the_conditional_std():
    """Guidance rescale (Lin et al. 2024, eq. 15-16): phi = 1 gives the conditional x0's per-sample std; phi mixes
    linearly."""
    schedule = make_schedule("cosine", 1000)
    space = DenseSpace((64, 3))
    cond = gaussian_denoiser(schedule, space, mu=MU)
    uncond = gaussian_denoiser(schedule, space, mu=-MU)
    x = space.randn(torch.Generator().manual_seed(9), dtype=torch.float64)
    t = torch.full((64,), 0.3, dtype=torch.float64)
    c_x0 = cond(x, t).x0
    plain = classifier_free_guidance(cond, uncond, 4.0, space)(x, t).x0
    assert not torch.allclose(space.std(plain), space.std(c_x0))  # guidance inflates the std
    full = classifier_free_guidance(cond, uncond, 4.0, space, schedule, rescale=1.0)(x, t).x0
    torch.testing.assert_close(space.std(full), space.std(c_x0))
    part = classifier_free_guidance(cond, uncond, 4.0, space, schedule, rescale=0.7)(x, t).x0
    torch.testing.assert_close(part, 0.7 * full + 0.3 * plain)


@pytest.mark.parametrize("name,steps", [("ddpm", 200), ("ddim", 50), ("dpmpp_2m", 20)])
def test_known_values_are_kept_and_independent_parts_keep_their_law(name, steps):
    """Imputation by replacement: the known coordinate ends exactly at its value; with independent coordinates
    the exact conditional of the others is their marginal, which every sampler must reproduce."""
    from polydiff.samplers import Known

    schedule = make_schedule("cosine", 1000)
    space = DenseSpace((4000, 3))
    var = torch.tensor([1.0, 0.25, 2.0], dtype=torch.float64)

    def denoise(x, t):  # the exact posterior mean of N(MU, diag(var))
        a, s = (space.expand(v) for v in schedule.alpha_sigma(t, dtype=torch.float64))
        x0 = MU + a * var / (a**2 * var + s**2) * (x - a * MU)
        return Prediction(x0, (x - a * x0) / s)

    g = torch.Generator().manual_seed(11)
    known = Known(torch.tensor([[5.0, 0.0, 0.0]], dtype=torch.float64), torch.tensor([[True, False, False]]))
    x = sample(name, denoise, space.randn(g, dtype=torch.float64), schedule, steps, generator=g, known=known)
    assert torch.equal(x[:, 0], torch.full((4000,), 5.0, dtype=torch.float64))
    assert (x[:, 1:].mean(0) - MU[1:]).abs().max() < 0.08
    assert (x[:, 1:].var(0) / var[1:] - 1).abs().max() < 0.1
    with pytest.raises(
        ValueError, match=r"known values \(1, 3\) and mask \(2, 4000, 3\) do not fit the state \(4000, 3\)"
    ):
        sample(
            name,
            denoise,
            space.randn(g, dtype=torch.float64),
            schedule,
            2,
            known=Known(known.values, torch.ones(2, 4000, 3)),
        )


def test_known_rows_of_a_zero_centre_of_mass_layout_keep_their_relative_geometry():
    from polydiff.samplers import Known

    schedule = make_schedule("cosine", 1000)
    space = RaggedSpace(torch.tensor([0, 0, 0, 1, 1]), 2, 3, centered=(0, 1, 2))
    zero = lambda x, t: Prediction(torch.zeros_like(x), x / space.expand(schedule.alpha_sigma(t, dtype=x.dtype)[1]))
    values = torch.tensor([[1.0, 0, 0], [0, 2.0, 0], [0, 0, 0], [0, 0, 0], [0, 0, 0]])
    mask = torch.tensor([True, True, False, False, False])[:, None]
    g = torch.Generator().manual_seed(0)
    x = sample_ddim(zero, space.randn(g), schedule, 10, space=space, generator=g, known=Known(values, mask))
    torch.testing.assert_close(x[0] - x[1], values[0] - values[1])  # the kept atoms, up to the re-centring
    torch.testing.assert_close(space.mean(x), torch.zeros(2))  # every molecule stays centred


def test_ragged_space_centred_columns_count_from_the_end_and_are_checked():
    batch, x = torch.tensor([0, 0, 1, 1, 1]), torch.arange(15.0).reshape(5, 3)
    for negative, positive in [((-1,), (2,)), ((-3, -2, -1), (0, 1, 2)), ((0, -1), (0, 2))]:
        space = RaggedSpace(batch, 2, 3, negative)
        assert space.centered == positive
        assert torch.equal(space.project(x), RaggedSpace(batch, 2, 3, positive).project(x))
    assert RaggedSpace(batch, 2, 3, (-1,)).project(x)[:, 2].tolist() == [-1.5, 1.5, -3.0, 0.0, 3.0]
    for bad in [(3,), (2, 3), (-4,)]:
        with pytest.raises(ValueError, match=r"centered columns \[-?\d\] are outside the state's 3 features"):
            RaggedSpace(batch, 2, 3, bad)


def test_ragged_space_moves_and_projects_without_reading_the_device():
    """On the meta device (no data), any host read or index list copied from the CPU would fail or show."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class Indices(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names, self.indices, self.devices = [], [], set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            tensors = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
            if str(func).startswith(("aten.index.", "aten.index_put")):
                self.indices += [i for i in tree_leaves(args[1]) if isinstance(i, torch.Tensor)]
            self.devices |= {a.device.type for a in tensors}
            return func(*args, **(kwargs or {}))

    batch = torch.tensor([0, 1, 0, 1, 1, 2])
    for centered in ((0, 1, 2), (0, 2)):
        cpu = RaggedSpace(batch, 3, 4, centered=centered)
        x = torch.randn(6, 4)
        cols = list(centered)  # the projection as written with a column list
        sub = x[:, cols]
        ref = x.clone()
        ref[:, cols] = sub - (cpu.segment_sum(sub) / cpu._counts.clamp(min=1).unsqueeze(-1).float())[batch]
        assert torch.equal(cpu.project(x), ref)
        meta, x = cpu.to("meta"), x.to("meta")  # no bincount or index check: they would read the device
        with Indices() as log:
            out = meta.project(x)
        assert out.device.type == "meta" and meta.count().device.type == "meta" and log.devices == {"meta"}
        assert "aten._local_scalar_dense.default" not in log.names
        # Only the space's own device tensors index: no list turned into an index (a copy from the host) per call.
        assert log.indices and all(any(i is own for own in (meta.batch, meta._cols)) for i in log.indices)


def test_bad_time_grids_and_sampler_values_are_refused():
    """A NaN grid, two grid times on one noise level (sigma 0: NaN samples), a negative eta and a non-positive
    clip_x0 (samples silently collapsed) are refused."""
    schedule, space = make_schedule("cosine", 100), DenseSpace((4, 3))
    den, noise = gaussian_denoiser(schedule, space), torch.randn(4, 3, dtype=torch.float64)
    for grid, message in (
        (torch.tensor([1.0, float("nan"), 0.0]), "decrease strictly"),
        (torch.tensor([1.0, 0.5, 1e-16, 0.0]), "same noise level"),
    ):
        with pytest.raises(ValueError, match=message):
            sample("ddim", den, noise, schedule, grid, space=space)
    with pytest.raises(ValueError, match=r"sampler.eta=-0.5 is outside \[0, 1\]"):
        sample_ddim(den, noise, schedule, 10, eta=-0.5, space=space)
    for name in ("ddpm", "ddim", "dpmpp_2m"):
        with pytest.raises(ValueError, match="sampler.clip_x0=-1.0 must be positive"):
            sample(name, den, noise, schedule, 10, space=space, clip_x0=-1.0)


def test_a_per_sample_grid_gives_each_sample_the_run_of_its_own_grid():
    """DDIM with a grid [n + 1, B] equals running each group of samples alone on its own 1-D grid."""
    schedule = make_schedule("linear", 1000)
    batch = torch.tensor([0, 0, 1, 2, 2, 2, 3])
    space = RaggedSpace(batch, 4, 3)
    noise = space.randn(torch.Generator().manual_seed(0), dtype=torch.float64)
    early = timesteps(10, 1000)
    late = early * 0.7  # samples 1 and 3 run from t = 0.7
    grid = torch.stack([early, late, early, late], dim=1)  # [n + 1, B]
    together = sample_ddim(gaussian_denoiser(schedule, space), noise, schedule, grid, space=space)
    for own, samples in ((early, [0, 2]), (late, [1, 3])):
        rows = torch.isin(batch, torch.tensor(samples))
        alone_space = RaggedSpace(torch.repeat_interleave(torch.arange(2), torch.bincount(batch)[samples]), 2, 3)
        alone = sample_ddim(gaussian_denoiser(schedule, alone_space), noise[rows], schedule, own, space=alone_space)
        torch.testing.assert_close(together[rows], alone, rtol=1e-10, atol=1e-10)


def test_ddpm_large_variance_adds_the_forward_process_noise():
    """variance="large" draws a step's noise with std sqrt(beta_t) (DDPM's sigma^2 = beta), "small" with the
    posterior's: from x = 0 with a denoiser answering x0 = 0 the posterior mean is 0, so the first step's state is
    that noise alone. The grid starts at t = 0.2, where the two variances differ (near t = 1 they almost agree);
    the last step, to clean data, adds no noise with either."""
    schedule, space = make_schedule("linear", 1000), DenseSpace((20000, 1))
    zero = lambda x, t: Prediction(torch.zeros_like(x), torch.zeros_like(x))
    grid, stds = torch.tensor([0.2, 0.1, 0.0], dtype=torch.float64), {}
    for variance in ("small", "large"):
        seen = []
        out = sample_ddpm(
            zero,
            torch.zeros(20000, 1, dtype=torch.float64),
            schedule,
            grid,
            space=space,
            generator=torch.Generator().manual_seed(1),
            variance=variance,
            callback=lambda info: seen.append(info["x"].std().item()),
        )
        stds[variance] = seen[0]
        assert torch.equal(out, torch.zeros_like(out))  # the final step is noiseless
    ab = schedule.alpha_bar(grid)
    ab_t, ab_prev = ab[0], ab[1]  # the first step, from t = 0.2
    beta = 1 - ab_t / ab_prev
    assert float((1 - ab_prev) / (1 - ab_t)) < 0.5  # the two variances are told apart here
    assert stds["large"] == pytest.approx(float(beta.sqrt()), rel=0.03)
    assert stds["small"] == pytest.approx(float((beta * (1 - ab_prev) / (1 - ab_t)).sqrt()), rel=0.03)
