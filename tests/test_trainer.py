"""Trainer behaviour on the worked example domain (2-D points, MLP): resume, NaN, atomic saves, DDP."""

import errno
import io
import json
import logging
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import polydiff.checkpoint as checkpoint_module
from examples.points import MLP, PointsDomain
from polydiff.checkpoint import load_checkpoint
from polydiff.config import RecipeConfig
from polydiff.objectives import Objective
from polydiff.resume import IncompatibleCheckpointError
from polydiff.stop import STOP_POLL_EVERY
from polydiff.trainer import NonFiniteLossError, Trainer, TrainingInterrupted, train

ROOT = Path(__file__).resolve().parents[1]


def config(**trainer):
    tc = dict(
        max_steps=30,
        batch_size=64,
        lr=1e-3,
        warmup_steps=5,
        ema_decay=0.9,
        device="cpu",
        ckpt_every=1000,
        num_samples=64,
        log_every=5,
        progress=False,
    )
    tc.update(trainer)
    return {
        "domain": {"name": "examples.points:PointsDomain", "size": 512},
        "model": {"width": 32, "depth": 2},
        "schedule": {"name": "cosine", "steps": 100},
        "objective": {"prediction": "v"},
        "trainer": tc,
        "sampler": {"name": "ddim", "steps": 10},
    }


def test_worked_example_learns_the_distribution(tmp_path):
    """A new domain registered in user code trains and samples in seconds on the CPU."""
    cfg = config(
        max_steps=1500, batch_size=256, lr=3e-3, warmup_steps=100, ema_decay=0.99, num_samples=1000, log_every=5
    )
    cfg["domain"]["size"] = 4096
    cfg["model"] = {"width": 128, "depth": 3}
    cfg["schedule"]["steps"] = 1000
    cfg["sampler"] = {"name": "dpmpp_2m", "steps": 20}
    result = train(cfg, tmp_path)
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in lines if r["kind"] == "train"]
    assert sum(losses[-20:]) / 20 < 0.9 * losses[0]
    # Mixture of 8 Gaussians (std 0.15) on a circle of radius 2: true mean distance to the nearest
    # centre is 0.15 * sqrt(pi / 2) = 0.19; noise (std 1) would sit ~1 away.
    assert result["dist_to_centre"] < 0.4
    assert result["modes_covered"] == 8
    assert (tmp_path / "checkpoints" / "last.pt").is_file()
    assert list((tmp_path / "samples").iterdir())


def test_resume_is_bit_identical(tmp_path):
    straight = tmp_path / "straight"
    train(config(max_steps=30), straight)
    split = tmp_path / "split"
    train(config(max_steps=12), split)
    train(config(max_steps=30), split)  # resume="auto" picks up last.pt
    a = load_checkpoint(straight / "checkpoints" / "last.pt")
    b = load_checkpoint(split / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 30
    for key in ("model", "ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs after resume"
    # Retraining from scratch would give the same bits: the second call must have logged only steps 13-30.
    records = [json.loads(l) for l in (split / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [5, 10, 12, 15, 20, 25, 30]


def test_resume_on_another_kind_of_device_continues_with_new_random_streams(tmp_path, caplog):
    """A run moved between GPU and CPU cannot restore its generator (a CUDA state is 16 bytes, a CPU one
    5,056): it resumes with a warning instead of a crash."""
    train(config(max_steps=6), tmp_path)
    path = tmp_path / "checkpoints" / "last.pt"
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["rng"]["device_type"] == "cpu" and ckpt["rng"]["cuda"] == []
    ckpt["rng"].update(
        device_type="cuda", generators=[torch.zeros(16, dtype=torch.uint8)], cuda=[torch.zeros(16, dtype=torch.uint8)]
    )
    torch.save(ckpt, path)
    with caplog.at_level(logging.WARNING):
        train(config(max_steps=10), tmp_path)
    assert "was trained on cuda, this run is on cpu" in caplog.text
    assert load_checkpoint(path)["step"] == 10


def test_ema_follows_the_exponential_average_of_the_weights(tmp_path):
    """ema = d * ema + (1 - d) * w after each step, with d = trainer.ema_decay: a decay other than 0.5, so that d and
    1 - d swapped would fail."""
    d = 0.9
    cfg = config(max_steps=5, ema_decay=d, lr=1e-2, warmup_steps=0)
    trainer = Trainer(OmegaConf.merge(OmegaConf.structured(RecipeConfig), cfg), tmp_path)
    after_step = []
    trainer.opt.register_step_post_hook(
        lambda opt, args, kwargs: after_step.append({n: p.detach().clone() for n, p in trainer.net.named_parameters()})
    )
    trainer.fit()
    assert len(after_step) == 5
    # AveragedModel copies the weights on its first update, then e = d * e + (1 - d) * w.
    expected = dict(after_step[0])
    for params in after_step[1:]:
        expected = {n: d * expected[n] + (1 - d) * w for n, w in params.items()}
    swapped = dict(after_step[0])
    for params in after_step[1:]:
        swapped = {n: (1 - d) * swapped[n] + d * w for n, w in params.items()}
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert int(ckpt["ema"]["n_averaged"]) == 5
    for name, value in expected.items():
        ema = ckpt["ema"][f"module.{name}"]
        torch.testing.assert_close(ema, value, rtol=1e-5, atol=1e-7, msg=f"ema.{name}")
        assert (ema - swapped[name]).abs().max() > 100 * (ema - value).abs().max() + 1e-6, f"ema.{name}: d, 1 - d"
        assert not torch.allclose(ema, ckpt["model"][name]), f"ema.{name} is the model"


def test_compiled_training_matches_eager_and_saves_plain_weights(tmp_path):
    """trainer.compile=true trains the same model; its checkpoint resumes (and samples) without compile."""
    train(config(max_steps=10), tmp_path / "eager")
    from torch._dynamo.utils import counters

    counters.clear()
    train(config(max_steps=10, compile=True), tmp_path / "compiled")
    assert counters["stats"]["unique_graphs"] >= 1, "trainer.compile=true did not compile the network"
    a = load_checkpoint(tmp_path / "eager" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "compiled" / "checkpoints" / "last.pt")
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys(), f"compiled {key} keys differ: {sorted(b[key])[:3]}"
        for name in a[key]:
            torch.testing.assert_close(b[key][name], a[key][name], rtol=1e-3, atol=1e-4, msg=f"{key}.{name}")
    train(config(max_steps=12), tmp_path / "compiled")  # resumes with the eager model
    assert load_checkpoint(tmp_path / "compiled" / "checkpoints" / "last.pt")["step"] == 12


def test_auto_device_without_gpu_points_to_the_cpu_profile(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger="polydiff"):
        Trainer(OmegaConf.merge(OmegaConf.structured(RecipeConfig), config(device="auto")), tmp_path / "auto")
    assert "no GPU found" in caplog.text and "profile=cpu" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="polydiff"):
        Trainer(OmegaConf.merge(OmegaConf.structured(RecipeConfig), config(device="cpu")), tmp_path / "cpu")
    assert "no GPU found" not in caplog.text


def test_trainer_threads_sets_torch_threads_for_the_run_and_restores_them(tmp_path, monkeypatch):
    """trainer.threads=1 trains with one CPU thread (what a CPU shared with other jobs wants) and leaves the process's
    thread count as it found it; a count below 0 is refused by name."""
    before = torch.get_num_threads()
    seen = []
    real_fit = Trainer.fit
    monkeypatch.setattr(Trainer, "fit", lambda self: seen.append(torch.get_num_threads()) or real_fit(self))
    train(config(max_steps=2, threads=1), tmp_path / "one")
    assert seen == [1] and torch.get_num_threads() == before
    train(config(max_steps=2), tmp_path / "default")
    assert seen == [1, before]  # 0, the default: torch's own count
    with pytest.raises(ValueError, match="trainer.threads=-1 must be a whole number >= 0"):
        train(config(max_steps=2, threads=-1), tmp_path / "bad")


def test_nan_loss_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    train(config(max_steps=10, ckpt_every=5), tmp_path)
    good = (tmp_path / "checkpoints" / "last.pt").read_bytes()
    poisoned = lambda self, split: torch.full((self.size, 2), float("nan"))
    monkeypatch.setattr(PointsDomain, "dataset", poisoned)
    with pytest.raises(NonFiniteLossError, match="last good checkpoint"):
        train(config(max_steps=20, ckpt_every=5), tmp_path)
    assert (tmp_path / "checkpoints" / "last.pt").read_bytes() == good
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["step"] == 10


def test_kill_during_save_keeps_last_complete_checkpoint(tmp_path, monkeypatch):
    train(config(max_steps=10, ckpt_every=5), tmp_path)
    good = (tmp_path / "checkpoints" / "last.pt").read_bytes()
    real_save = torch.save

    def dying_save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # the process dies mid-write

    monkeypatch.setattr(checkpoint_module.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        train(config(max_steps=20, ckpt_every=5), tmp_path)
    monkeypatch.setattr(checkpoint_module.torch, "save", real_save)
    assert (tmp_path / "checkpoints" / "last.pt").read_bytes() == good
    # A temporary file left by a hard kill does not disturb resuming either.
    (tmp_path / "checkpoints" / ".last.pt.stale.tmp").write_bytes(b"torn")
    train(config(max_steps=15), tmp_path)
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["step"] == 15


def test_stale_temporary_checkpoints_of_killed_writes_are_removed_at_start_up(tmp_path, caplog):
    """A write killed mid-way leaves .last.pt.PID.HEX.tmp, as large as a checkpoint: the next start removes it once
    its writer is gone, and keeps one whose writer still runs (however old)."""
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    stale, live = folder / f".last.pt.{gone.pid}.0123abcd.tmp", folder / f".last.pt.{os.getpid()}.89abcdef.tmp"
    an_hour_ago = time.time() - 3600
    for path in (stale, live):
        path.write_bytes(b"part of a checkpoint")
        os.utime(path, (an_hour_ago, an_hour_ago))
    with caplog.at_level(logging.INFO, logger="polydiff"):
        train(config(max_steps=3, num_samples=8), tmp_path)
    assert not stale.exists() and live.exists()
    assert f"removed 1 stale temporary checkpoint file(s) left by a killed write: {stale}" in caplog.text
    assert load_checkpoint(folder / "last.pt")["step"] == 3


def test_a_checkpoint_without_its_device_type_resumes_by_its_config_or_names_the_fix(tmp_path):
    """Checkpoints written before rng.device_type: the kind of device comes from their trainer.device; with
    trainer.device=auto it is unknown, and the error gives the command that adds it."""
    train(config(max_steps=10), tmp_path / "straight")
    run = tmp_path / "run"
    train(config(max_steps=6), run)
    path = run / "checkpoints" / "last.pt"
    ckpt = torch.load(path, weights_only=True)
    del ckpt["rng"]["device_type"], ckpt["rng"]["cuda"], ckpt["rng"]["torch_ranks"], ckpt["data"]  # the older layout
    torch.save(ckpt, path)
    before = path.read_bytes()
    ckpt["config"]["trainer"]["device"] = "auto"
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match=re.escape(f"checkpoint {path} has no rng.device_type")) as info:
        train(config(max_steps=10), run)
    command = str(info.value).split("e.g.: ")[1]
    assert command.endswith(f"{path} cuda")
    subprocess.run(command[: -len("cuda")] + "cpu", shell=True, check=True)
    assert torch.load(path, weights_only=True)["rng"]["device_type"] == "cpu"
    path.write_bytes(before)  # trainer.device=cpu: its streams are restored
    train(config(max_steps=10), run)
    a, b = (load_checkpoint(tmp_path / r / "checkpoints" / "last.pt") for r in ("straight", "run"))
    assert a["step"] == b["step"] == 10
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


@pytest.mark.parametrize("name, code, said", [("SIGINT", 130, "interrupted"), ("SIGTERM", 143, "stopped by SIGTERM")])
def test_ctrl_c_or_sigterm_saves_the_last_step_and_the_rerun_resumes_without_duplicate_records(
    tmp_path, name, code, said
):
    """Ctrl-C, or a cluster scheduler's SIGTERM (SLURM's preemption or time limit, Kubernetes), exits with 128 + the
    signal's number once the step in progress is saved."""
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "polydiff.cli",
        "train",
        "examples/points.yaml",
        "trainer.max_steps=1000000",
        "trainer.log_every=10",
        "trainer.ckpt_every=1000000",
        "trainer.progress=false",
        "trainer.num_workers=1",
        "trainer.grad_accum=4",
        f"hydra.run.dir={run_dir}",
    ]
    # Its own process group, which a terminal's Ctrl-C (or SLURM) signals whole: the data-loading worker too.
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    metrics = run_dir / "metrics.jsonl"
    for _ in range(600):  # until a few steps are logged
        if metrics.is_file() and metrics.read_text().count("\n") >= 2:
            break
        proc.poll() is None or pytest.fail(proc.communicate()[1][-2000:])
        time.sleep(0.1)
    os.killpg(proc.pid, getattr(signal, name))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-2000:]
    step = load_checkpoint(run_dir / "checkpoints" / "last.pt")["step"]
    assert f"training {said} at step {step} of 1000000" in err and "Traceback" not in err
    # A hard kill after the last checkpoint leaves records past it: the resumed run drops them, then logs its own.
    with open(metrics, "a") as f:
        f.write(json.dumps({"kind": "train", "step": step + 5, "loss": 1.0}) + "\n")
        f.write('{"kind": "train", "st')  # torn by the kill
    cmd[cmd.index("trainer.max_steps=1000000")] = f"trainer.max_steps={step + 20}"
    rerun = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert (
        rerun.returncode == 0
        and f"resumed from {run_dir / 'checkpoints' / 'last.pt'} at step {step}" in rerun.stdout + rerun.stderr
    )
    assert "dropped a line that is not a JSON record" in rerun.stdout + rerun.stderr
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert {"kind": "train", "step": step + 5, "loss": 1.0} not in records  # logged past the checkpoint: dropped
    steps = [r["step"] for r in records if r["kind"] == "train"]
    assert steps == sorted(set(steps)) and steps[-1] == step + 20


def test_incompatible_checkpoint_is_named(tmp_path):
    train(config(max_steps=5), tmp_path)
    other = config(max_steps=10)
    other["model"]["width"] = 48
    with pytest.raises(IncompatibleCheckpointError, match="model"):
        train(other, tmp_path)
    # The advice it gives, trainer.resume=never, starts afresh without overwriting the saved run.
    saved = (tmp_path / "checkpoints" / "last.pt").read_bytes()
    other["trainer"]["resume"] = "never"
    train(other, tmp_path)
    (previous,) = tmp_path.glob("previous-*")
    assert (previous / "checkpoints" / "last.pt").read_bytes() == saved
    assert (previous / "metrics.jsonl").is_file() and (previous / "samples").is_dir()
    assert "step 5" in (previous / "report.html").read_text()  # the old run's page, beside the files it shows
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["step"] == 10
    with pytest.raises(ValueError, match="not a polydiff checkpoint"):
        bogus = tmp_path / "bogus.pt"
        torch.save({"weights": torch.zeros(1)}, bogus)
        load_checkpoint(bogus)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("batch_size", 0, "trainer.batch_size=0 is out of range: it must be at least 1"),
        ("grad_accum", 0, "trainer.grad_accum=0"),
        ("log_every", 0, "trainer.log_every=0"),
        ("num_samples", 0, "trainer.num_samples=0"),
        ("label_dropout", 2, "trainer.label_dropout=2.0 is out of range: it must be between 0 and 1"),
        ("device", "gpu", "trainer.device='gpu' is not a device"),
        ("precision", "fp16", "unknown trainer.precision 'fp16'; choose one of ['auto', 'fp32', 'bf16']"),
        ("lr_decay", "linear", "unknown trainer.lr_decay 'linear'"),
        ("ema_decay", 1.5, "trainer.ema_decay=1.5 is out of range: it must be between 0 and 1"),
        ("lr", -1.0, "trainer.lr=-1.0 is out of range"),
        ("betas", [0.9], "trainer.betas=[0.9] must be two numbers in [0, 1)"),
    ],
)
def test_bad_trainer_values_are_named_before_training(tmp_path, key, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        train(config(**{key: value}), tmp_path)
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize(
    "key, value, error, message",
    [
        (
            "name",
            "dpmpp2m",
            KeyError,
            "unknown sampler 'dpmpp2m'. Known samplers: ['consistency', 'ddim', 'ddpm', 'dpmpp_2m', 'euler', 'heun', "
            "'ode', 'sde']. Did you mean 'dpmpp_2m'?",
        ),
        ("steps", 500, ValueError, "sampler.steps must be in 1..100 (the schedule's trained steps), got 500"),
        ("spacing", "uniform", KeyError, "unknown sampler.spacing 'uniform'"),
        ("precision", "fp16", ValueError, "sampler.precision='fp16': choose one of ['fp32', 'bf16']"),
        ("batch_size", 0, ValueError, "sampler.batch_size must be a positive number of samples, got 0"),
    ],
)
def test_bad_sampler_values_are_named_before_training(tmp_path, key, value, error, message):
    """A recipe's sampler section is only used when sampling, after training: it is checked first."""
    cfg = config(sample_every=0)
    cfg["sampler"] = {**cfg["sampler"], key: value}
    with pytest.raises(error, match=re.escape(message)):
        train(cfg, tmp_path)
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()


def test_a_bad_value_with_resume_never_leaves_the_previous_run_in_place(tmp_path):
    """Values are checked before trainer.resume=never moves the previous run aside."""
    train(config(max_steps=5), tmp_path)
    with pytest.raises(ValueError, match="trainer.precision"):
        train(config(max_steps=5, resume="never", precision="fp16"), tmp_path)
    assert (tmp_path / "checkpoints" / "last.pt").is_file() and not list(tmp_path.glob("previous-*"))


def test_resume_applies_the_recipes_lr_betas_and_weight_decay(tmp_path, caplog):
    """The checkpoint's optimizer and scheduler states carry the old values: the recipe's win from the resumed step."""
    train(config(max_steps=10, lr=1e-3), tmp_path)
    with caplog.at_level(logging.INFO, logger="polydiff"):
        train(config(max_steps=15, lr=1e-4, weight_decay=0.1, betas=[0.8, 0.99]), tmp_path)
    assert "trainer.lr=0.0001 replaces the checkpoint's 0.001" in caplog.text
    group = load_checkpoint(tmp_path / "checkpoints" / "last.pt")["optimizer"]["param_groups"][0]
    assert group["lr"] == pytest.approx(1e-4) and group["weight_decay"] == 0.1 and tuple(group["betas"]) == (0.8, 0.99)
    records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in records if r["kind"] == "train" and r["step"] > 10] == [pytest.approx(1e-4)]
    # The schedule is the recipe's at the resumed step, its own record of the rate included.
    cfg = config(max_steps=20, lr=2e-4, warmup_steps=30)
    trainer = Trainer(OmegaConf.merge(OmegaConf.structured(RecipeConfig), cfg), tmp_path)
    assert trainer.step == trainer.sched.last_epoch == 15 and trainer.sched.base_lrs == [2e-4]
    assert trainer.sched.get_last_lr() == [g["lr"] for g in trainer.opt.param_groups] == [pytest.approx(2e-4 * 16 / 30)]


def test_rerun_with_resume_path_goes_on_from_the_runs_own_checkpoint(tmp_path, caplog):
    """trainer.resume=PATH starts a run from PATH; the same command again continues that run, not PATH over it."""
    train(config(max_steps=6), tmp_path / "base")
    base = tmp_path / "base" / "checkpoints" / "last.pt"
    run = tmp_path / "finetune"
    train(config(max_steps=10, resume=str(base)), run)
    with caplog.at_level(logging.INFO, logger="polydiff"):
        train(config(max_steps=14, resume=str(base)), run)
    assert f"resumed from {run / 'checkpoints' / 'last.pt'} at step 10" in caplog.text
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 14 and load_checkpoint(base)["step"] == 6
    with pytest.raises(FileNotFoundError, match="trainer.resume='nevr' is neither auto, never nor an existing"):
        train(config(resume="nevr"), tmp_path / "typo")
    with pytest.raises(FileNotFoundError, match="is a folder: give a checkpoint file"):
        train(config(resume=str(tmp_path / "base")), tmp_path / "folder")


def test_resume_past_max_steps_is_refused(tmp_path):
    train(config(max_steps=10), tmp_path)
    saved = (tmp_path / "checkpoints" / "last.pt").read_bytes()
    with pytest.raises(ValueError, match="is at step 10, past trainer.max_steps=5: raise trainer.max_steps"):
        train(config(max_steps=5), tmp_path)
    assert (tmp_path / "checkpoints" / "last.pt").read_bytes() == saved


def test_a_network_that_does_not_fit_the_checkpoint_is_named(tmp_path, monkeypatch):
    """A domain setting that reshapes the network (its config unchanged) fails naming the checkpoint, not torch's
    bare state-dict error."""
    train(config(max_steps=5), tmp_path)
    monkeypatch.setattr(PointsDomain, "build_network", lambda self, width=128, depth=3: MLP(width, depth + 1))
    with pytest.raises(IncompatibleCheckpointError, match=f"checkpoint {re.escape(str(tmp_path))}.* holds a network"):
        train(config(max_steps=10), tmp_path)


def test_failed_checkpoint_write_keeps_the_last_one_and_says_so(tmp_path, monkeypatch):
    """A full disk during a periodic checkpoint: the previous last.pt stays, no temporary file is left, and the
    error names the file, the step and how to go on."""
    train(config(max_steps=5), tmp_path)
    good = (tmp_path / "checkpoints" / "last.pt").read_bytes()

    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if isinstance(f, io.BytesIO):  # in memory (the domain state's load check), not on the disk
            return real_save(obj, f, *args, **kwargs)
        f.write(b"part of a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_module.torch, "save", full_disk)
    path = tmp_path / "checkpoints" / "last.pt"
    message = re.escape(f"could not write the checkpoint of step 8 to {path} (No space left on device)")
    with pytest.raises(OSError, match=message + ".*still holds"):
        train(config(max_steps=10, ckpt_every=8), tmp_path)
    assert (tmp_path / "checkpoints" / "last.pt").read_bytes() == good
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["last.pt"]


def test_keep_every_keeps_a_snapshot_per_step_that_later_saves_do_not_change(tmp_path):
    """trainer.keep_every keeps step_NNNNNNN.pt beside last.pt (also between ckpt_every saves); each holds its own
    step's weights after last.pt has moved on, and a run resumed from a snapshot matches the straight run."""
    train(config(max_steps=12, ckpt_every=5, keep_every=4), tmp_path)
    ckpts = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == [
        "last.pt",
        "step_0000004.pt",
        "step_0000008.pt",
        "step_0000012.pt",
    ]
    steps = {p.name: load_checkpoint(p)["step"] for p in ckpts.iterdir()}
    assert steps == {"last.pt": 12, "step_0000004.pt": 4, "step_0000008.pt": 8, "step_0000012.pt": 12}
    resumed = tmp_path / "resumed"
    train(config(max_steps=12, resume=str(ckpts / "step_0000008.pt")), resumed)
    a, b = load_checkpoint(ckpts / "last.pt"), load_checkpoint(resumed / "checkpoints" / "last.pt")
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])
    with pytest.raises(ValueError, match="trainer.keep_every=-1 is out of range"):
        train(config(keep_every=-1), tmp_path / "bad")


def test_checkpoints_get_the_permissions_of_any_new_file(tmp_path):
    """Not mkstemp's 0600: others in a group can read (sample, evaluate) a run's checkpoints."""
    old = os.umask(0o022)
    try:
        checkpoint_module.atomic_save({"x": torch.zeros(1)}, tmp_path / "last.pt")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "last.pt").stat().st_mode) == 0o644


def test_a_write_failing_inside_torch_save_is_an_os_error(tmp_path):
    """torch's zip writer turns a failed write (a full disk; here a file-size limit) into RuntimeError("unexpected
    pos"): atomic_save raises the OSError behind it, which the trainer names, and keeps the previous file."""
    resource = pytest.importorskip("resource")
    path = tmp_path / "last.pt"
    checkpoint_module.atomic_save({"x": torch.zeros(1)}, path)
    good = path.read_bytes()
    limits, handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, limits[1]))  # 64 KiB: the 1 MiB tensor stops half-way
    try:
        with pytest.raises(OSError) as info:
            checkpoint_module.atomic_save({"x": torch.zeros(1 << 18)}, path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    assert info.value.errno == errno.EFBIG
    assert path.read_bytes() == good and [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_interrupt_message_names_the_run_directory(tmp_path):
    """'Run the same command again' resumes only in the same run directory (Hydra's default one is new each time)."""
    trainer = Trainer(OmegaConf.merge(OmegaConf.structured(RecipeConfig), config(max_steps=100)), tmp_path)
    trainer.opt.register_step_post_hook(
        lambda opt, args, kwargs: signal.raise_signal(signal.SIGINT) if trainer.step == 2 else None
    )
    with pytest.raises(TrainingInterrupted, match=re.escape(f"with hydra.run.dir={tmp_path} to resume")):
        trainer.fit()
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["step"] == 3


@pytest.mark.parametrize("name", ["SIGTERM", "SIGUSR1"])
def test_a_schedulers_signal_stops_after_the_step_in_progress_and_the_rerun_is_bit_identical(tmp_path, name):
    """SIGTERM (SLURM's preemption or time limit, Kubernetes) or SLURM's ``--signal=USR1@SECONDS`` stops like a first
    Ctrl-C, and a repeated one (a scheduler and a launcher may both send it) does not stop any sooner."""
    signum = getattr(signal, name, None) or pytest.skip(f"no {name} on this platform")

    def reached_the_test(sig, frame):
        raise AssertionError(f"{name} reached the test: the trainer did not handle it")

    previous = signal.signal(signum, reached_the_test)
    try:
        split = tmp_path / "split"
        trainer = Trainer(OmegaConf.merge(OmegaConf.structured(RecipeConfig), config(max_steps=30)), split)

        def signal_twice_during_step_12(opt, args, kwargs):
            if trainer.step == 11:
                os.kill(os.getpid(), signum)
                os.kill(os.getpid(), signum)

        trainer.opt.register_step_post_hook(signal_twice_during_step_12)
        with pytest.raises(
            TrainingInterrupted, match=re.escape(f"training stopped by {name} at step 12 of 30")
        ) as info:
            trainer.fit()
        assert signal.getsignal(signum) is reached_the_test  # the trainer's handler was put back
    finally:
        signal.signal(signum, previous)
    assert info.value.signum == signum
    assert load_checkpoint(split / "checkpoints" / "last.pt")["step"] == 12
    assert not (split / "samples").exists()  # stopped without the final draw
    train(config(max_steps=30), split)
    train(config(max_steps=30), tmp_path / "straight")
    a, b = (load_checkpoint(tmp_path / run / "checkpoints" / "last.pt") for run in ("straight", "split"))
    assert a["step"] == b["step"] == 30
    for key in ("model", "ema"):
        for param in a[key]:
            assert torch.equal(a[key][param], b[key][param]), f"{key}.{param} differs after the stop and resume"


def test_a_second_ctrl_c_stops_at_once(tmp_path):
    """As before SIGTERM joined it: the second Ctrl-C ends the run without waiting for the step or a checkpoint."""
    trainer = Trainer(OmegaConf.merge(OmegaConf.structured(RecipeConfig), config(max_steps=100)), tmp_path)

    def ctrl_c_twice(opt, args, kwargs):
        if trainer.step == 2:
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)

    trainer.opt.register_step_post_hook(ctrl_c_twice)
    with pytest.raises(KeyboardInterrupt) as info:
        trainer.fit()
    assert not isinstance(info.value, TrainingInterrupted)
    assert not (tmp_path / "checkpoints" / "last.pt").exists()


def test_grad_accumulation_and_cosine_lr(tmp_path, monkeypatch):
    train(config(max_steps=8, grad_accum=2, lr_decay="cosine", batch_size=32), tmp_path)
    records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["kind"] == "train"]
    assert train_records[-1]["lr"] < 1e-3 * 0.5  # cosine decay towards the end
    assert all(r["samples_per_s"] > 0 for r in train_records)

    # Two micro-batches of 32 take the same items as one batch of 64; with each item's time and target
    # fixed by the item itself, the accumulated gradient must equal the large batch's.
    def per_item_loss(self, net, batch, schedule, generator=None):
        x0 = batch.x
        return ((net(x0, x0[:, 0].sigmoid()) - x0.flip(1)) ** 2).mean()

    monkeypatch.setattr(Objective, "loss", per_item_loss)

    def step_grads(run_dir, **tc):
        trainer = Trainer(
            OmegaConf.merge(OmegaConf.structured(RecipeConfig), config(max_steps=2, grad_clip=0, **tc)), run_dir
        )
        grads = []
        trainer.opt.register_step_pre_hook(
            lambda opt, args, kwargs: grads.append([p.grad.clone() for p in trainer.net.parameters()])
        )
        trainer.fit()
        return grads

    accumulated = step_grads(tmp_path / "accum", grad_accum=2, batch_size=32)
    large = step_grads(tmp_path / "large", grad_accum=1, batch_size=64)
    assert len(accumulated) == len(large) == 2
    for step, (a, b) in enumerate(zip(accumulated, large)):
        for g_a, g_b in zip(a, b):
            torch.testing.assert_close(g_a, g_b, msg=f"gradient at step {step}")


# Runs ``polydiff train`` with each rank saving its final weights and first batch to DUMP/rank{N}.pt.
DDP_LAUNCHER = """
import sys
import torch
from polydiff import trainer
from polydiff.cli import main

dump = sys.argv.pop(1)
real_fit, real_micro_step = trainer.Trainer.fit, trainer.Trainer._micro_step
first_batch, losses, draws = [], [], []

def micro_step(self, batch, last):
    first_batch.append(batch.x.clone())
    draws.append(torch.rand(1))  # the global stream dropout and augmentation draw from
    losses.append(float(real_micro_step(self, batch, last)))
    return torch.tensor(losses[-1])

def fit(self):
    result = real_fit(self)
    torch.save({"model": self.net.state_dict(), "first_batch": first_batch[0], "losses": losses,
                "draws": torch.cat(draws)}, f"{dump}/rank{self.rank}.pt")
    return result

trainer.Trainer._micro_step, trainer.Trainer.fit = micro_step, fit
main()
"""


def _torchrun_points(tmp_path: Path, launcher: str, *overrides: str, timeout: int) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node 2`` of ``launcher`` (which takes TMP_PATH first) training examples/points.yaml
    into TMP_PATH/ddp over gloo, batch 64 per process, a record every 5 steps."""
    script = tmp_path / "launch.py"
    script.write_text(launcher)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--standalone",
        str(script),
        str(tmp_path),
        "train",
        str(ROOT / "examples" / "points.yaml"),
        "trainer.batch_size=64",
        "trainer.log_every=5",
        "model.width=32",
        f"hydra.run.dir={tmp_path / 'ddp'}",
        *overrides,
    ]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_ddp_two_processes_on_cpu(tmp_path):
    """``torchrun --nproc_per_node 2`` runs DistributedDataParallel over gloo."""
    run_dir = tmp_path / "ddp"
    proc = _torchrun_points(
        tmp_path,
        DDP_LAUNCHER,
        "trainer.max_steps=20",
        "trainer.num_samples=32",
        "trainer.ckpt_every=10",
        "trainer.sample_every=10",
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["kind"] == "train"]
    assert train_records and all(r["world_size"] == 2 for r in train_records)
    assert len(train_records) == 4  # only rank 0 logs
    assert [r["step"] for r in records if r["kind"] == "eval"] == [10, 20]  # rank 1 waited for both draws
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert ckpt["step"] == 20 and len(ckpt["rng"]["generators"]) == 2
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert not torch.equal(rank0["first_batch"], rank1["first_batch"]), "both ranks drew the same data"
    assert not (rank0["draws"] == rank1["draws"]).any(), "dropout masks and augmentations would repeat across ranks"
    both = (torch.tensor(rank0["losses"]) + torch.tensor(rank1["losses"])) / 2  # [20]: the mean over ranks
    for r in train_records:  # the logged loss is the mean over both ranks' batches since the last record
        assert r["loss"] == pytest.approx(float(both[r["step"] - 5 : r["step"]].mean()), rel=1e-5)
    ranks = ckpt["rng"]["torch_ranks"]
    assert len(ranks) == 2 and not torch.equal(ranks[0], ranks[1])
    for name, value in ckpt["model"].items():
        assert torch.equal(rank0["model"][name], value), f"rank 0's {name} is not the checkpoint's"
        assert torch.equal(rank1["model"][name], value), f"rank 1's {name} differs from rank 0's"


# Rank 1 alone is sent SIGTERM, during step 4; each rank writes the step it stopped at and its exit code to
# DUMP/rank{N}.json.
DDP_STOP_LAUNCHER = """
import json
import os
import signal
import sys
from polydiff import trainer
from polydiff.cli import main

dump = sys.argv.pop(1)
real_train_steps, real_micro_step = trainer.Trainer.train_steps, trainer.Trainer._micro_step

def micro_step(self, batch, last):
    if self.rank == 1 and self.step == 3:
        os.kill(os.getpid(), signal.SIGTERM)
    return real_micro_step(self, batch, last)

def train_steps(self):
    try:
        real_train_steps(self)
    finally:
        stopped.append(self.step)

stopped = []
trainer.Trainer._micro_step, trainer.Trainer.train_steps = micro_step, train_steps
try:
    main()
except SystemExit as err:
    with open(f"{dump}/rank{os.environ['RANK']}.json", "w") as f:
        json.dump({"step": stopped[0], "exit": err.code}, f)
    raise
"""


def test_ddp_processes_stop_at_the_same_step_when_one_is_signalled(tmp_path):
    """SLURM signals every process (torchrun forwards its own SIGTERM to each): the processes agree on the stop
    every STOP_POLL_EVERY steps, so one signalled alone stops them all at the same step, with one checkpoint."""
    run_dir = tmp_path / "ddp"
    proc = _torchrun_points(
        tmp_path,
        DDP_STOP_LAUNCHER,
        "trainer.max_steps=1000000",
        "trainer.ckpt_every=1000000",
        "trainer.progress=false",
        timeout=180,
    )
    assert proc.returncode != 0, proc.stderr[-3000:]  # the run is unfinished: a scheduler may requeue it
    stopped = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert stopped == [{"step": STOP_POLL_EVERY, "exit": 143}] * 2, proc.stderr[-3000:]  # 128 + SIGTERM
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert ckpt["step"] == STOP_POLL_EVERY and len(ckpt["rng"]["generators"]) == 2
    assert "SIGTERM (rank 1): every process stops with a checkpoint" in proc.stdout  # Hydra logs to stdout
    said = f"polydiff: training stopped by SIGTERM at step {STOP_POLL_EVERY} of 1000000"
    assert proc.stderr.count(said) == 1, proc.stderr[-3000:]  # rank 0 says it for both
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(5, STOP_POLL_EVERY + 1, 5))


def test_torchrun_without_a_run_folder_is_refused(monkeypatch):
    """Hydra's default folder holds the start time, read by each process on its own: ranks could split."""
    from polydiff.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match="under torchrun, give every process the same run folder: add hydra.run.dir"):
        main(["train", str(ROOT / "examples" / "points.yaml")])


def test_resume_with_another_global_batch_goes_on_from_the_same_point_of_the_data(tmp_path, caplog):
    """10 steps of 64 samples, resumed at 32 per step: the data order continues at batch 20 of 32, not 10."""
    train(config(max_steps=10, ckpt_every=10), tmp_path)
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["data"] == {"position": 10, "global_batch": 64}
    with caplog.at_level(logging.WARNING):
        train(config(max_steps=14, batch_size=32, ckpt_every=14), tmp_path)
    assert "global batch of 64" in caplog.text and "this run has 32" in caplog.text
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["data"] == {"position": 24, "global_batch": 32}


def test_logged_lr_is_the_steps_own_and_the_last_checkpoint_is_written_once(tmp_path, monkeypatch):
    """metrics.jsonl's lr is the rate the step used (warm-up: step k of 5 at k/5 of the peak), and a final
    step that is also a checkpoint step is saved once."""
    writes = []
    real = checkpoint_module.atomic_save
    monkeypatch.setattr(
        "polydiff.checkpointer.atomic_save", lambda obj, path: (writes.append(obj["step"]), real(obj, path))
    )
    train(config(max_steps=10, ckpt_every=5, log_every=1, warmup_steps=5, sample_every=0), tmp_path)
    records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["step"]: r["lr"] for r in records if r["kind"] == "train"}
    assert [lrs[k] for k in (1, 2, 5, 6, 10)] == pytest.approx([2e-4, 4e-4, 1e-3, 1e-3, 1e-3])
    assert writes == [5, 10]


def test_running_a_finished_run_again_replaces_its_final_evaluation(tmp_path):
    """The same command on a finished run draws and scores the final samples again, without a second record."""
    cfg = config(max_steps=6)
    train(cfg, tmp_path)
    before = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train(cfg, tmp_path)
    after = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    kinds = [r["kind"] for r in after]
    assert kinds == [r["kind"] for r in before] and kinds.count("eval") == 1
    assert [r for r in after if r["kind"] == "train"] == [r for r in before if r["kind"] == "train"]


def test_ema_update_matches_averaged_model_without_moving_its_counter():
    """Bit for bit AveragedModel's EMA; its CPU step counter never copied to the network's device (a GPU sync)."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    from polydiff.train_step import update_ema as _update_ema

    torch.manual_seed(0)
    net = MLP(16, 2)
    net.register_buffer("calls", torch.zeros((), dtype=torch.long))  # an integer buffer takes the non-lerp path
    ours, ref = (AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True) for _ in range(2))
    for _ in range(4):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
            net.calls += 3
        _update_ema(ours, net)
        ref.update_parameters(net)
        assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), ref.state_dict().values()))

    class Reads(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.mixed = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            devices = {a.device.type for a in tree_leaves((args, kwargs, out)) if isinstance(a, torch.Tensor)}
            if len(devices) > 1 or func is torch.ops.aten._local_scalar_dense.default and "meta" in devices:
                self.mixed.append(str(func))
            return out

    meta_net = MLP(16, 2).to("meta")  # the network on a device; AveragedModel keeps n_averaged on the CPU
    ema = AveragedModel(meta_net, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    _update_ema(ema, meta_net)  # the first call copies
    with Reads() as log:
        _update_ema(ema, meta_net)
    assert log.mixed == [] and int(ema.n_averaged) == 2
    with Reads() as log:
        ema.update_parameters(meta_net)  # what it replaces moves the counter to the device every step
    assert log.mixed


class PairsDomain(PointsDomain):
    """(point, label) pairs with the template's collate and setup: the label is the point's mixture component // 4."""

    def dataset(self, split):
        points = super().dataset(split)
        return [(p, int(torch.atan2(p[1], p[0]) % (2 * torch.pi) >= torch.pi)) for p in points]

    def build_network(self, width=32, depth=2):
        return LabelledMLP(width, depth)


class LabelledMLP(MLP):
    def __init__(self, width, depth):
        super().__init__(width, depth)
        self.embed = torch.nn.Embedding(3, 2)  # two classes and the null label -1 (index 2)

    def forward(self, x, t, label):
        return super().forward(x + self.embed(torch.where(label < 0, 2, label)), t)


def test_template_setup_names_the_classes_of_labelled_pairs(tmp_path):
    """A data set of (tensor, label) pairs trains a conditional model that is sampled by label afterwards."""
    cfg = config(max_steps=3, num_samples=4)
    cfg["domain"] = {"name": f"{__name__}:PairsDomain", "size": 256}
    train(cfg, tmp_path)
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert ckpt["domain_state"]["class_names"] == ["0", "1"]
    from polydiff.cli import main

    main(["sample", str(tmp_path), "--n", "2", "label=1", "guidance.scale=2", "--out", str(tmp_path / "s")])
    assert torch.load(tmp_path / "s" / "samples.pt", weights_only=True)["label"].tolist() == [1, 1]


def test_gradient_clipping_and_label_dropout_take_effect(tmp_path, monkeypatch):
    """trainer.grad_clip bounds the gradient norm each step sees; trainer.label_dropout nulls that share of labels
    (none at 0)."""
    norms = []
    cfg = config(max_steps=4, grad_clip=1e-3, lr=1e-2)
    cfg["domain"] = {"name": f"{__name__}:PairsDomain", "size": 256}
    trainer = Trainer(OmegaConf.merge(OmegaConf.structured(RecipeConfig), cfg), tmp_path / "clip")
    trainer.opt.register_step_pre_hook(
        lambda opt, args, kwargs: norms.append(
            float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in trainer.net.parameters()])))
        )
    )
    trainer.train_steps()
    assert len(norms) == 4 and max(norms) <= 1e-3 * 1.0001
    real, seen = Trainer._micro_step, []

    def record(self, batch, last):
        loss = real(self, batch, last)
        seen.append(batch.cond["label"].clone())  # as the network saw them
        return loss

    monkeypatch.setattr(Trainer, "_micro_step", record)
    for dropout, expected in ((0.5, 0.5), (0.0, 0.0)):
        seen.clear()
        cfg = config(max_steps=20, label_dropout=dropout)
        cfg["domain"] = {"name": f"{__name__}:PairsDomain", "size": 256}
        Trainer(OmegaConf.merge(OmegaConf.structured(RecipeConfig), cfg), tmp_path / f"drop{dropout}").train_steps()
        nulled = float((torch.cat(seen) == -1).float().mean())
        assert nulled == pytest.approx(expected, abs=0.06)
