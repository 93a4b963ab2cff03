"""What several test files share: Gaussian data with its exact denoiser on any schedule, a tiny points recipe, and
the command line called in-process with its one-line error returned."""

from polydiff.cli import main
from polydiff.state import Prediction

MU, VAR = 0.7, 0.25  # x0 ~ N(MU, VAR), one dimension per element


def exact_denoiser(schedule):
    """The posterior mean of ``x0 ~ N(MU, VAR)`` given the VP state ``x = a x0 + s eps`` at ``schedule``'s time."""

    def denoise(x, t):
        ab = schedule.alpha_bar(t).to(x.dtype)[:, None]
        a, s = ab.sqrt(), (1 - ab).sqrt()
        x0 = MU + a * VAR * (x - a * MU) / (a * a * VAR + s * s)
        return Prediction(x0, (x - a * x0) / s)

    return denoise


#: Overrides of examples/points.yaml that train in seconds.
TINY_POINTS = [
    "model.width=16",
    "model.depth=1",
    "domain.size=256",
    "trainer.batch_size=32",
    "trainer.num_samples=16",
]


def cli(*args: str) -> str:
    """Run ``polydiff ARGS`` in this process: ``""`` when it succeeds, else the one-line message it exits with."""
    try:
        main(list(args))
    except SystemExit as err:
        if err.code not in (0, None):
            return str(err.code)
    return ""
