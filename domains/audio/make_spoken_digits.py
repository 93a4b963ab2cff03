"""Build the spoken-digits data set: "zero".."nine" synthesised by espeak-ng in many voices.

Each clip is one word, resampled to ``--rate``, trimmed of leading and trailing silence,
peak-normalised, and placed ``ONSET`` seconds into a ``--seconds``-long window. The voice
(accent plus variant), speed and pitch of every clip are drawn from a seeded generator, so
the same options always give the same set. Output: ``<out>/<label>/<label>_<index>.flac``
plus ``<out>/metadata.csv`` with ``file,label,split,voice,speed,pitch``.

    python -m domains.audio.make_spoken_digits                      # the shipped set
    python -m domains.audio.make_spoken_digits --per-digit 1000 --out /data/digits_big
"""

from __future__ import annotations

import argparse
import csv
import random
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

from .data import DIGITS, METADATA_COLUMNS, SPOKEN_DIGITS_DIR

# Accents that ship with espeak-ng's own data (the mbrola voices need extra packages).
ACCENTS = ["en", "en-us", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-029", "en-us-nyc"]
# Voice variants: formant sets and timbres, male and female.
VARIANTS = [
    "",
    "m1",
    "m2",
    "m3",
    "m4",
    "m5",
    "m6",
    "m7",
    "f1",
    "f2",
    "f3",
    "f4",
    "f5",
    "klatt",
    "klatt2",
    "klatt3",
    "croak",
    "Alex",
    "Annie",
    "Andy",
    "steph",
    "linda",
    "grandpa",
    "john",
]
SPEEDS = (120, 210)  # words per minute
PITCHES = (20, 80)  # espeak-ng pitch, 0..99
ONSET = 0.05  # seconds of silence before each word
PEAK = 0.95  # peak amplitude after normalisation
SILENCE_DB = -40.0  # trim threshold relative to the clip's peak
TEST_EVERY = 8  # one clip in TEST_EVERY (per digit) goes to the test split


def synthesise(word: str, voice: str, speed: int, pitch: int, workdir: Path) -> tuple[np.ndarray, int]:
    """One word from espeak-ng as a float waveform ``[L]`` and its sample rate."""
    wav = workdir / "word.wav"
    cmd = ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(wav), word]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0 or not wav.exists():
        raise RuntimeError(f"espeak-ng failed for {' '.join(cmd)}: {result.stderr.strip()}")
    audio, rate = sf.read(wav, dtype="float32", always_2d=True)
    return audio.mean(axis=1), rate


def trim_silence(audio: np.ndarray, threshold_db: float = SILENCE_DB) -> np.ndarray:
    """Drop leading and trailing samples quieter than ``threshold_db`` below the peak."""
    peak = float(np.abs(audio).max())
    if peak == 0.0:
        raise ValueError("espeak-ng produced a silent clip")
    loud = np.nonzero(np.abs(audio) >= peak * 10 ** (threshold_db / 20))[0]
    return audio[loud[0] : loud[-1] + 1]


def render_clip(audio: np.ndarray, rate: int, out_rate: int, seconds: float) -> np.ndarray:
    """Resample, trim, peak-normalise and place a word in a fixed window ``[round(out_rate*seconds)]``."""
    audio = AF.resample(torch.from_numpy(audio), rate, out_rate).numpy()
    audio = trim_silence(audio)
    length = round(out_rate * seconds)
    onset = round(out_rate * ONSET)
    if onset + len(audio) > length:
        raise ValueError(
            f"a word of {len(audio) / out_rate:.2f} s does not fit a {seconds} s window; "
            f"raise --seconds or the minimum speed"
        )
    clip = np.zeros(length, dtype=np.float32)
    clip[onset : onset + len(audio)] = audio * (PEAK / np.abs(audio).max())
    return clip


def build(out: Path, per_digit: int, rate: int, seconds: float, seed: int) -> list[dict[str, str]]:
    """Write ``per_digit`` clips of every digit to ``out``; returns the metadata rows."""
    if shutil.which("espeak-ng") is None:
        raise RuntimeError("espeak-ng is not installed (Debian/Ubuntu: apt-get install espeak-ng)")
    rng = random.Random(seed)
    rows: list[dict[str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for index in range(per_digit):
            split = "test" if index % TEST_EVERY == 0 else "train"
            for label in DIGITS:
                accent, variant = rng.choice(ACCENTS), rng.choice(VARIANTS)
                voice = f"{accent}+{variant}" if variant else accent
                speed, pitch = rng.randint(*SPEEDS), rng.randint(*PITCHES)
                audio, src_rate = synthesise(label, voice, speed, pitch, Path(tmp))
                clip = render_clip(audio, src_rate, rate, seconds)
                rel = Path(label) / f"{label}_{index:04d}.flac"
                (out / label).mkdir(parents=True, exist_ok=True)
                sf.write(out / rel, clip, rate, format="FLAC", subtype="PCM_16", compression_level=1.0)
                rows.append(
                    {
                        "file": rel.as_posix(),
                        "label": label,
                        "split": split,
                        "voice": voice,
                        "speed": str(speed),
                        "pitch": str(pitch),
                    }
                )
    with open(out / "metadata.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(METADATA_COLUMNS))
        writer.writeheader()
        writer.writerows(rows)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=SPOKEN_DIGITS_DIR, help=f"output folder (default: {SPOKEN_DIGITS_DIR})"
    )
    parser.add_argument("--per-digit", type=int, default=80, help="clips per digit (default: 80)")
    parser.add_argument("--rate", type=int, default=16000, help="sample rate in Hz (default: 16000)")
    parser.add_argument("--seconds", type=float, default=1.0, help="clip length in seconds (default: 1.0)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the voice/speed/pitch draws (default: 0)")
    parser.add_argument("--force", action="store_true", help="replace an existing set in --out")
    args = parser.parse_args(argv)
    if args.per_digit < 1 or args.rate < 1000 or args.seconds <= ONSET:
        parser.error("--per-digit must be >= 1, --rate >= 1000 and --seconds > 0.05")
    if (args.out / "metadata.csv").exists():
        if not args.force:
            parser.error(f"{args.out} already holds a data set; pass --force to replace it")
        for label in DIGITS:
            shutil.rmtree(args.out / label, ignore_errors=True)
    rows = build(args.out, args.per_digit, args.rate, args.seconds, args.seed)
    size = sum(p.stat().st_size for p in args.out.rglob("*.flac"))
    n_test = sum(r["split"] == "test" for r in rows)
    print(f"wrote {len(rows)} clips ({len(rows) - n_test} train, {n_test} test, {size / 2**20:.1f} MiB) to {args.out}")


if __name__ == "__main__":
    main()
