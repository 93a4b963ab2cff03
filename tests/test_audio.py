"""The audio domain: loaders, conversions, bad inputs, network conditioning, outputs, metrics, training."""

import csv
import json
import logging
import math
import re
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from domains.audio import AudioDomain
from domains.audio.data import DIGITS, SPOKEN_DIGITS_DIR, folder_index, load_clips, sc09_index, spoken_digits_index
from domains.audio.io import AudioFileError, Conversions, load_clip, read_audio, resample
from polydiff import Batch, DenseSpace

TINY_NET = dict(channels=8, channel_mults=[1, 2], down_factors=[4], num_res_blocks=1, mid_attention=False)


def tone(freq: float, rate: int, seconds: float, channels: int = 1, amp: float = 0.5) -> np.ndarray:
    t = np.arange(round(rate * seconds)) / rate
    wave = amp * np.sin(2 * math.pi * freq * t).astype(np.float32)
    return np.stack([wave * (c + 1) / channels for c in range(channels)], axis=1)  # [L, C]


@pytest.fixture
def labelled_folder(tmp_path):
    """cat/ and dog/ clips at mixed rates, channel counts and lengths."""
    root = tmp_path / "sounds"
    for label, freq in (("cat", 300.0), ("dog", 700.0)):
        (root / label).mkdir(parents=True)
        for i in range(6):
            rate = 8000 if i % 2 else 16000
            sf.write(root / label / f"{label}{i}.wav", tone(freq, rate, 0.3 + 0.2 * i, channels=1 + i % 2), rate)
    return root


# ------------------------------------------------------------------ loaders
def test_folder_loader_labels_resamples_and_mixes(labelled_folder, caplog):
    (labelled_folder / "cat" / "notes.txt").write_text("not audio")
    (labelled_folder / "dog" / "bark.mp3").write_bytes(b"ID3")
    domain = AudioDomain(dataset="folder", root=str(labelled_folder), sample_rate=4000, duration=0.5, test_fraction=0.3)
    with caplog.at_level(logging.INFO):
        train, test = domain.dataset("train"), domain.dataset("test")
    assert len(train) + len(test) == 12 and len(test) > 0
    assert train.class_names == ["cat", "dog"] and domain.class_names == ["cat", "dog"]
    assert train.waves.shape[1:] == (1, 2000)
    assert {p.name for p in train.files}.isdisjoint({p.name for p in test.files})
    for wave, label, path in zip(train.waves, train.labels, train.files):
        assert train.class_names[int(label)] == path.parent.name
    text = caplog.text
    assert "resampled" in text and "16000 Hz to 4000 Hz" in text and "8000 Hz to 4000 Hz" in text
    assert "mixed" in text and "mono" in text
    assert "cropped" in text and "zero-padded" in text
    assert "ignored 2 file(s) that are not .wav/.flac" in text and "bark.mp3" in text


def test_a_data_set_is_a_row_of_the_table(tmp_path, monkeypatch):
    """A new data set is an index function in ``DATASETS``; labels it fixes keep their order in the model."""
    from domains.audio.data import DATASETS, AudioSource

    for label, freq in (("low", 300.0), ("high", 900.0)):
        (tmp_path / label).mkdir()
        for i in range(4):
            sf.write(tmp_path / label / f"{label}{i}.wav", tone(freq, 8000, 0.2), 8000)
    monkeypatch.setitem(DATASETS, "pitches", AudioSource(folder_index, labels=("low", "high")))
    with pytest.raises(ValueError, match="domain.dataset='pitches' needs domain.root"):
        AudioDomain(dataset="pitches")
    domain = AudioDomain(dataset="pitches", root=str(tmp_path), sample_rate=8000, duration=0.2, test_fraction=0.5)
    train = domain.dataset("train")
    assert domain.class_names == ["low", "high"]
    assert all(train.class_names[int(y)] == path.parent.name for y, path in zip(train.labels, train.files))


def test_explicit_train_test_folders_and_unlabelled_audio(tmp_path):
    for split in ("train", "test"):
        for label in ("a", "b"):
            (tmp_path / "split" / split / label).mkdir(parents=True)
            sf.write(tmp_path / "split" / split / label / "x.flac", tone(440, 8000, 0.2), 8000)
    index = folder_index(tmp_path / "split", "test")
    assert sorted(label for _, label in index) == ["a", "b"]
    assert all("test" in p.parts for p, _ in index)
    (tmp_path / "flat").mkdir()
    for i in range(4):
        sf.write(tmp_path / "flat" / f"{i}.wav", tone(440, 8000, 0.2), 8000)
    domain = AudioDomain(
        dataset="folder",
        root=str(tmp_path / "flat"),
        sample_rate=8000,
        duration=0.2,
        conditional=False,
        test_fraction=0.5,
    )
    clips = domain.dataset("train")
    assert clips.class_names == [] and bool((clips.labels == -1).all())
    assert domain.collate([clips[0], clips[0]]).cond == {}


def test_resampling_keeps_pitch_and_level_and_mono_is_the_channel_mean(tmp_path):
    wave = torch.from_numpy(tone(440.0, 16000, 1.0)[:, 0])
    down = resample(wave, 16000, 4000)  # [4000]
    assert down.shape == (4000,)
    spectrum = torch.fft.rfft(down).abs()
    assert abs(int(spectrum.argmax()) - 440) <= 1  # 1 Hz bins for a 1 s clip
    assert down[100:-100].abs().max() == pytest.approx(0.5, abs=0.02)
    stereo = tone(440.0, 8000, 0.25, channels=2)  # right channel = 2 x left
    sf.write(tmp_path / "s.wav", stereo, 8000)
    conv = Conversions()
    mono = load_clip(tmp_path / "s.wav", 8000, 1, 2000, conv)
    assert conv.mixed[2] == 1
    assert torch.allclose(mono[0], torch.from_numpy(stereo.mean(1)), atol=1e-4)
    both = load_clip(tmp_path / "s.wav", 8000, 2, 2000, Conversions())
    assert both.shape == (2, 2000)


def make_fake_sc09(root: Path, base: Optional[Path] = None) -> Path:
    """Speech Commands v0.02 in miniature at ``base`` (default: the documented
    ROOT/SpeechCommands/speech_commands_v0.02)."""
    base = base or root / "SpeechCommands" / "speech_commands_v0.02"
    words = DIGITS + ["cat"]
    for w, word in enumerate(words):
        (base / word).mkdir(parents=True)
        for s in range(3):
            sf.write(base / word / f"spk{s}_nohash_0.wav", tone(200 + 50 * w, 16000, 1.0), 16000)
    (base / "_background_noise_").mkdir()
    sf.write(base / "_background_noise_" / "white_noise.wav", tone(300, 16000, 1.0), 16000)
    (base / "validation_list.txt").write_text("\n".join(f"{w}/spk1_nohash_0.wav" for w in words) + "\n")
    (base / "testing_list.txt").write_text("\n".join(f"{w}/spk2_nohash_0.wav" for w in words) + "\n")
    return base


def test_sc09_layout_uses_the_official_lists_and_only_digits(tmp_path):
    make_fake_sc09(tmp_path)
    train, valid, test = (sc09_index(tmp_path, s) for s in ("train", "valid", "test"))
    assert len(train) == len(valid) == len(test) == 10
    assert all(p.name == "spk0_nohash_0.wav" for p, _ in train)
    assert all(p.name == "spk1_nohash_0.wav" for p, _ in valid)
    assert all(p.name == "spk2_nohash_0.wav" for p, _ in test)
    assert sorted(label for _, label in test) == sorted(DIGITS)
    domain = AudioDomain(dataset="sc09", root=str(tmp_path), sample_rate=2000)
    clips = domain.dataset("test")
    assert clips.waves.shape == (10, 1, 2000) and clips.class_names == DIGITS
    assert [clips.class_names[int(y)] for y in clips.labels] == [p.parent.name for p in clips.files]


def test_sc09_folder_of_any_name_is_read_with_the_official_split(tmp_path):
    """A copy whose folder name holds dots (``speech-commands-v0.02``) works as domain.root itself, with the same
    split as the documented layout (only digits, no background noise)."""
    own = make_fake_sc09(tmp_path, tmp_path / "data.v2" / "speech-commands-v0.02")
    documented = make_fake_sc09(tmp_path / "x.y")
    for split in ("train", "valid", "test"):
        index = sc09_index(own, split)
        assert [(p.relative_to(own), label) for p, label in index] == [
            (p.relative_to(documented), label) for p, label in sc09_index(tmp_path / "x.y", split)
        ]
        assert len(index) == 10 and all(p.is_file() and p.parent.name == label for p, label in index)
    clips = AudioDomain(dataset="sc09", root=str(own), sample_rate=2000).dataset("valid")
    assert clips.waves.shape == (10, 1, 2000) and clips.class_names == DIGITS


@pytest.mark.parametrize("missing", ["testing_list.txt", "validation_list.txt"])
def test_sc09_missing_split_list_is_named(tmp_path, missing):
    base = make_fake_sc09(tmp_path)
    (base / missing).unlink()
    for root in (tmp_path, base):  # domain.root at the parent (documented layout) or at the copy itself
        with pytest.raises(
            FileNotFoundError, match=f"but not {missing}: looked for {re.escape(str(base / missing))}. Copy"
        ) as err:
            AudioDomain(dataset="sc09", root=str(root)).dataset("train")
        assert "no Speech Commands v0.02 copy" not in str(err.value)


def test_sc09_missing_copy_says_where_to_put_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"SpeechCommands/speech_commands_v0\.02"):
        AudioDomain(dataset="sc09", root=str(tmp_path / "nowhere")).dataset("train")


@pytest.mark.parametrize("split", ["train", "test"])
def test_sc09_copy_missing_a_digit_is_refused_by_name(tmp_path, split):
    base = make_fake_sc09(tmp_path)
    for path in (base / "nine").iterdir():
        path.unlink()
    (base / "nine").rmdir()
    with pytest.raises(
        ValueError,
        match=rf"all ten digit words, but the '{split}' split .* has none of \['nine'\]: the "
        rf"folder\(s\) {re.escape(str(base / 'nine'))}/ are missing",
    ):
        sc09_index(tmp_path, split)
    with pytest.raises(ValueError, match=r"has none of \['nine'\]"):
        AudioDomain(dataset="sc09", root=str(tmp_path), sample_rate=2000).dataset(split)


def test_sc09_test_list_without_a_digit_is_refused(tmp_path):
    base = make_fake_sc09(tmp_path)
    listed = (base / "testing_list.txt").read_text().splitlines()
    (base / "testing_list.txt").write_text("\n".join(line for line in listed if not line.startswith("seven/")) + "\n")
    with pytest.raises(
        ValueError,
        match=rf"'test' split .* has none of \['seven'\]: .*testing_list.txt names none of "
        rf"the files in {re.escape(str(base / 'seven'))}/",
    ):
        sc09_index(tmp_path, "test")


def test_sc09_listed_file_that_was_deleted_is_skipped_with_one_warning(tmp_path, caplog):
    """Deleting a bad clip (as the silent-clip error says) leaves its list entry: skipped, not an error loop."""
    base = make_fake_sc09(tmp_path)
    sf.write(base / "seven" / "spk3_nohash_0.wav", np.zeros((16000, 1), dtype=np.float32), 16000)  # a silent clip
    with open(base / "testing_list.txt", "a") as f:
        f.write("seven/spk3_nohash_0.wav\neight/gone_nohash_0.wav\nnine/gone_nohash_1.wav\n")
    with pytest.raises(
        AudioFileError,
        match=r"spk3_nohash_0.wav is silent after loading \(all zeros\): delete it .*"
        r"testing_list.txt names but that is missing is skipped",
    ):
        AudioDomain(dataset="sc09", root=str(tmp_path), sample_rate=2000).dataset("test")
    (base / "seven" / "spk3_nohash_0.wav").unlink()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        clips = AudioDomain(dataset="sc09", root=str(tmp_path), sample_rate=2000).dataset("test")
    assert len(clips) == 10
    warnings = [r.getMessage() for r in caplog.records if "names but that are missing" in r.getMessage()]
    assert len(warnings) == 1 and "skipped 3 file(s) that testing_list.txt names" in warnings[0]
    assert "seven/spk3_nohash_0.wav" in warnings[0] and "eight/gone_nohash_0.wav" in warnings[0]


def test_shipped_spoken_digits_set():
    rows = list(csv.DictReader(open(SPOKEN_DIGITS_DIR / "metadata.csv")))
    assert set(rows[0]) == {"file", "label", "split", "voice", "speed", "pitch"}
    assert len({r["voice"] for r in rows}) > 50
    train, test = spoken_digits_index(SPOKEN_DIGITS_DIR, "train"), spoken_digits_index(SPOKEN_DIGITS_DIR, "test")
    assert {p for p, _ in train}.isdisjoint({p for p, _ in test})
    for index in (train, test):
        counts = {d: sum(label == d for _, label in index) for d in DIGITS}
        assert len(set(counts.values())) == 1  # balanced
    size = sum(p.stat().st_size for p in SPOKEN_DIGITS_DIR.rglob("*.flac"))
    assert size < 8.5e6
    wave, rate = read_audio(train[0][0])
    assert rate == 16000 and wave.shape == (1, 16000)
    assert float(wave.abs().max()) == pytest.approx(0.95, abs=0.01)
    domain = AudioDomain(sample_rate=2000, duration=0.7, limit=50)
    clips = domain.dataset("test")
    assert clips.waves.shape == (50, 1, 1400) and clips.class_names == DIGITS


# ------------------------------------------------------------------ bad inputs
@pytest.mark.parametrize(
    "content, match",
    [
        (b"", "is empty"),
        (b"RIFF\x00\x00 this is not audio at all" * 10, "could not decode"),
        (b"hello, world\n", "could not decode"),
    ],
)
def test_bad_files_are_named(tmp_path, content, match):
    (tmp_path / "a").mkdir()
    sf.write(tmp_path / "a" / "good.wav", tone(300, 8000, 0.2), 8000)
    bad = tmp_path / "a" / "bad.wav"
    bad.write_bytes(content)
    with pytest.raises(AudioFileError, match=match) as err:
        load_clips(folder_index(tmp_path, "train", test_fraction=0.01), 8000, 1, 1600)
    assert "bad.wav" in str(err.value)


def test_hidden_folders_and_files_are_skipped_at_every_level(tmp_path):
    for rel in ("cat/a.wav", "cat/b.wav", "dog/c.wav", ".git/h.wav", "cat/.ipynb_checkpoints/x.wav", "dog/.d.wav"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        sf.write(tmp_path / rel, tone(440, 8000, 0.2), 8000)
    index = folder_index(tmp_path, "train", test_fraction=0.01) + folder_index(tmp_path, "test", test_fraction=0.01)
    assert sorted(p.name for p, _ in index) == ["a.wav", "b.wav", "c.wav"]
    assert {label for _, label in index} == {"cat", "dog"}
    domain = AudioDomain(dataset="folder", root=str(tmp_path), sample_rate=8000, duration=0.2, test_fraction=0.01)
    assert domain.dataset("train").class_names == ["cat", "dog"]


def test_symlinked_label_folders_are_followed_and_loops_are_not(tmp_path, caplog):
    """Path.rglob does not enter symlinked folders (Python 3.11): a linked label folder must still count."""
    elsewhere = tmp_path / "elsewhere" / "dog"
    elsewhere.mkdir(parents=True)
    root = tmp_path / "sounds"
    for label, folder in (("cat", root / "cat"), ("dog", elsewhere)):
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(3):
            sf.write(folder / f"{label}{i}.wav", tone(300 + 400 * (label == "dog") + 20 * i, 8000, 0.2), 8000)
    (root / "dog").symlink_to(elsewhere, target_is_directory=True)
    (root / "cat" / "loop").symlink_to(root, target_is_directory=True)  # a link back up: must not be walked forever
    with caplog.at_level(logging.WARNING):
        index = folder_index(root, "train", test_fraction=0.01) + folder_index(root, "test", test_fraction=0.01)
    assert sorted(p.name for p, _ in index) == [f"{label}{i}.wav" for label in ("cat", "dog") for i in range(3)]
    assert all(p.parent.name == label for p, label in index) and {label for _, label in index} == {"cat", "dog"}
    assert "links back to" in caplog.text and "loop" in caplog.text
    domain = AudioDomain(dataset="folder", root=str(root), sample_rate=8000, duration=0.2, test_fraction=0.01)
    assert domain.dataset("train").class_names == ["cat", "dog"]
    samples = tmp_path / "samples"
    samples.mkdir()
    (samples / "dog").symlink_to(elsewhere, target_is_directory=True)  # polydiff eval of a linked folder
    batch = domain.read_samples(samples)
    assert batch.num_samples == 3 and batch.cond["label"].tolist() == [1, 1, 1]


def test_folder_without_audio_channel_mismatch_and_unknown_labels(tmp_path):
    (tmp_path / "empty" / "x").mkdir(parents=True)
    (tmp_path / "empty" / "x" / "notes.txt").write_text("no audio here")
    with pytest.raises(ValueError, match="no .wav/.flac files"):
        AudioDomain(dataset="folder", root=str(tmp_path / "empty")).dataset("train")
    (tmp_path / "three").mkdir()
    sf.write(tmp_path / "three" / "surround.wav", tone(300, 8000, 0.2, channels=3), 8000)
    with pytest.raises(AudioFileError, match="surround.wav has 3 channels"):
        load_clips(folder_index(tmp_path / "three", "train", test_fraction=0.01), 8000, 2, 1600)
    with pytest.raises(ValueError, match=r"label\(s\) \['dog'\] are not among"):
        load_clips([(tmp_path / "three" / "surround.wav", "dog")], 8000, 1, 1600, class_names=["cat"])
    with pytest.raises(ValueError, match="domain.classifier_epochs must be at least 1"):
        AudioDomain(classifier_epochs=0)
    domain = AudioDomain()
    assert domain.parse_label("seven") == 7 and domain.parse_label(3) == 3
    with pytest.raises(ValueError, match="unknown label 'eleven'"):
        domain.parse_label("eleven")
    for bad in (3.5, True, [1, 2]):  # label=3.5 / label=true / label=[1,2] parse to these: never a silent class
        with pytest.raises(ValueError, match="neither a class name nor an index"):
            domain.parse_label(bad)
    # Class names that are numbers: a name picks its own class, and bare indices are refused as ambiguous.
    for name in ("3", "5", "7"):
        (tmp_path / "numbers" / name).mkdir(parents=True)
        for k in range(2):
            sf.write(tmp_path / "numbers" / name / f"{k}.wav", tone(300 + 100 * k, 8000, 0.1), 8000)
    numbers = AudioDomain(
        dataset="folder", root=str(tmp_path / "numbers"), sample_rate=8000, duration=0.1, test_fraction=0.01
    )
    numbers.setup(numbers.dataset("train"))
    assert numbers.class_names == ["3", "5", "7"]
    assert numbers.parse_label(5) == 1 and numbers.parse_label("7") == 2
    with pytest.raises(ValueError, match="ambiguous"):
        numbers.parse_label(1)
    meta = tmp_path / "digits"
    meta.mkdir()
    (meta / "metadata.csv").write_text("file,label,split,voice,speed,pitch\nx.flac,eleven,train,en,150,50\n")
    with pytest.raises(ValueError, match="line 2: unknown label 'eleven'"):
        spoken_digits_index(meta, "train")
    with pytest.raises(
        ValueError,
        match=r"unknown domain.dataset 'mp3s'; choose one of \['spoken_digits', 'folder', "
        r"'sc09'\]",
    ):
        AudioDomain(dataset="mp3s")


# ------------------------------------------------------------------ network
def test_network_conditioning_and_null_label():
    domain = AudioDomain(sample_rate=2000, duration=0.5)
    net = domain.build_network(**TINY_NET)
    torch.nn.init.normal_(net.head[-1].weight, std=0.1)  # the head starts at zero; make outputs visible
    x, t = torch.randn(4, 1, 1000), torch.full((4,), 0.5)
    outs = {y: net(x, t, label=torch.full((4,), y)) for y in (-1, 3, 7)}
    assert all(o.shape == x.shape and torch.isfinite(o).all() for o in outs.values())
    assert not torch.allclose(outs[3], outs[7]) and not torch.allclose(outs[-1], outs[3])
    space, cond = domain.prior(4)
    assert space.shape == (4, 1, 1000) and bool((cond["label"] == -1).all())
    space, _ = domain.prior(2, torch.tensor([1, 2]), duration=0.75)
    assert space.shape == (2, 1, 1500)
    with pytest.raises(KeyError, match="model.in_channels is set by the audio domain"):
        domain.build_network(in_channels=2, **TINY_NET)
    unconditional = AudioDomain(sample_rate=2000, duration=0.5, conditional=False).build_network(**TINY_NET)
    assert unconditional.num_classes == 0


# ------------------------------------------------------------------ outputs
def test_save_samples_writes_wavs_and_a_spectrogram_sheet(tmp_path, caplog):
    domain = AudioDomain(sample_rate=4000, duration=0.5)
    x = (torch.rand(3, 1, 2000, generator=torch.Generator().manual_seed(0)) - 0.5) * 1.2  # within [-0.6, 0.6]
    x[0, 0, 10] = 1.7  # one overshooting value: clipped, and said so
    batch = Batch(x, DenseSpace(tuple(x.shape)), {"label": torch.tensor([7, 0, -1])})
    with caplog.at_level(logging.WARNING):
        paths = domain.save_samples(batch, tmp_path, prefix="step_10")
    assert "clipped 1 sample value" in caplog.text
    wavs = [p for p in paths if p.suffix == ".wav"]
    assert [p.name for p in wavs] == ["step_10_000_seven.wav", "step_10_001_zero.wav", "step_10_002_uncond.wav"]
    for p, ref in zip(wavs, x):
        data, rate = sf.read(p, dtype="float32")
        assert rate == 4000 and data.shape == (2000,)
        assert np.isfinite(data).all() and np.abs(data).max() <= 1.0
        assert np.allclose(data[20:], ref[0, 20:].numpy(), atol=1e-3)
    png = next(p for p in paths if p.suffix == ".png")
    with Image.open(png) as im:
        im.verify()
    with Image.open(png) as im:
        assert im.size[0] > 100 and im.size[1] > 100
    bad = Batch(torch.full((1, 1, 2000), float("nan")), DenseSpace((1, 1, 2000)), {"label": torch.tensor([1])})
    with pytest.raises(ValueError, match="NaN or infinite"):
        domain.save_samples(bad, tmp_path)


# ------------------------------------------------------------------ metrics
def test_metrics_rank_real_clips_above_noise(tmp_path, monkeypatch):
    monkeypatch.setenv("POLYDIFF_CACHE", str(tmp_path / "cache"))
    domain = AudioDomain(sample_rate=2000, duration=0.7, classifier_epochs=6, limit=300)
    test = domain.dataset("test")
    with torch.no_grad():  # as the trainer calls it
        real = domain.evaluate(Batch(test.waves, DenseSpace(tuple(test.waves.shape)), {"label": test.labels}))
    noise_x = torch.randn_like(test.waves) * 0.3
    noise = domain.evaluate(Batch(noise_x, DenseSpace(tuple(noise_x.shape)), {"label": test.labels}))
    assert real["is"] > 3 * noise["is"] and real["fid"] < noise["fid"] / 10
    assert real["label_acc"] > 0.8 and noise["label_acc"] < 0.5
    assert real["am"] < noise["am"]
    ref = domain.reference_metrics(50)
    assert set(ref) >= {"fid", "is", "mis", "am", "label_acc"}
    cached = list((tmp_path / "cache" / "audio").glob("digit_classifier_*.pt"))
    assert len(cached) == 1
    # A second domain with the same data reuses the weights; another rate gets its own classifier.
    again = AudioDomain(sample_rate=2000, duration=0.7, classifier_epochs=6, limit=300)
    assert again.reference_metrics(50) == ref
    assert len(list((tmp_path / "cache" / "audio").glob("*.pt"))) == 1


def test_unconditional_reference_row_has_no_label_accuracy_like_its_samples(tmp_path, monkeypatch, labelled_folder):
    """An unconditional model's samples carry no labels, so its reference row must not report label_acc either."""
    monkeypatch.setenv("POLYDIFF_CACHE", str(tmp_path / "cache"))
    rows = {}
    for conditional in (True, False):
        domain = AudioDomain(
            dataset="folder",
            root=str(labelled_folder),
            sample_rate=4000,
            duration=0.5,
            test_fraction=0.3,
            classifier_epochs=1,
            conditional=conditional,
        )
        domain.setup(domain.dataset("train"))
        test = domain.dataset("test")
        labelled = {"label": test.labels}  # as polydiff eval reads files named by label (_seven)
        rows[conditional] = (
            domain.reference_metrics(10),
            domain.evaluate(Batch(test.waves, DenseSpace(tuple(test.waves.shape)), labelled)),
        )
    assert "label_acc" in rows[True][0] and "label_acc" in rows[True][1]
    reference, samples = rows[False]
    assert "label_acc" not in reference and "label_acc" not in samples and "fid" in reference and "fid" in samples


def test_evaluate_scores_the_clipped_waves_that_are_written(tmp_path):
    """sampling.json describes the WAVs: evaluate sees samples clipped to [-1, 1] as save_samples writes them."""

    class Recorder:  # stands in for the fitted classifier scorer
        def __init__(self) -> None:
            self.seen: list[torch.Tensor] = []

        def score(self, x: torch.Tensor, labels=None) -> dict[str, float]:
            self.seen.append(x.clone())
            return {"peak": float(x.abs().max())}

    domain = AudioDomain(sample_rate=2000, duration=0.5)
    domain.outputs._scorer = recorder = Recorder()
    x = torch.randn(3, 1, 1000, generator=torch.Generator().manual_seed(0))  # peaks near 3: overshoots [-1, 1]
    batch = Batch(x, DenseSpace(tuple(x.shape)), {"label": torch.tensor([1, 2, 3])})
    assert domain.evaluate(batch)["peak"] == 1.0
    wavs = [p for p in domain.save_samples(batch, tmp_path) if p.suffix == ".wav"]
    written = torch.stack([torch.from_numpy(sf.read(p, dtype="float32", always_2d=True)[0].T) for p in wavs])
    assert torch.allclose(recorder.seen[0], written, atol=1e-4)  # 16-bit PCM rounding
    real = x.clamp(-0.9, 0.9)  # real clips lie within [-1, 1]: scored unchanged
    domain.evaluate(Batch(real, DenseSpace(tuple(real.shape)), {}))
    assert torch.equal(recorder.seen[1], real)


def test_classifier_cache_key_follows_the_clips_not_their_location(tmp_path, labelled_folder):
    """A moved copy of the same data reuses the fitted metric classifier; changed clips or settings do not."""
    from domains.audio.metrics import classifier_cache_path

    def key(root: Path, **kwargs) -> Path:
        domain = AudioDomain(
            dataset="folder", root=str(root), sample_rate=4000, duration=0.5, test_fraction=0.3, **kwargs
        )
        return classifier_cache_path(domain.data_config(), domain.dataset("train"), tmp_path / "cache")

    moved = tmp_path / "elsewhere" / "sounds.v2"
    moved.parent.mkdir()
    labelled_folder.rename(moved)
    first = key(moved)
    moved.rename(tmp_path / "again")
    assert key(tmp_path / "again") == first
    assert key(tmp_path / "again", crop="center") != first
    for wav in (tmp_path / "again" / "cat").glob("*.wav"):  # same names, other sounds
        sf.write(wav, tone(350.0, 16000, 0.3), 16000)
    assert key(tmp_path / "again") != first


def test_metric_classifier_cache_file_of_the_shipped_digits_is_pinned(monkeypatch):
    """Cached classifiers (and the figures they gave) stay valid: the shipped set's default cache file name is fixed."""
    from domains.audio import features, metrics

    seen = {}

    class Fitted:  # what make_scorer logs
        test_accuracy = 1.0

    def capture(make_net, train, heldout, cache, fit_kwargs, device=None):
        seen.update(cache=cache, fit_kwargs=fit_kwargs)
        return Fitted()

    monkeypatch.setattr(metrics, "cached_scorer", capture)
    monkeypatch.setenv("POLYDIFF_CACHE", "/cache")
    AudioDomain().outputs.scorer()
    assert seen["cache"] == Path("/cache/audio/digit_classifier_4d33dd78d8aa8ae7.pt")
    assert seen["fit_kwargs"] == {"epochs": 10, "batch_size": 64, "lr": 3e-3, "augment": features.augment_waves}


def test_metric_classifier_is_refitted_when_its_epochs_change(tmp_path, monkeypatch, labelled_folder):
    """domain.classifier_epochs is part of the cache key: other epochs never reuse weights fitted with fewer."""
    monkeypatch.setenv("POLYDIFF_CACHE", str(tmp_path / "cache"))
    for epochs in (1, 2, 1):
        domain = AudioDomain(
            dataset="folder",
            root=str(labelled_folder),
            sample_rate=4000,
            duration=0.5,
            test_fraction=0.3,
            classifier_epochs=epochs,
        )
        domain.setup(domain.dataset("train"))
        assert "fid" in domain.reference_metrics(4)
    assert len(list((tmp_path / "cache" / "audio").glob("digit_classifier_*.pt"))) == 2


def test_sample_labels_with_underscores_are_read_back_from_file_names(tmp_path):
    """``samples_000_left_hand.wav`` is "left_hand" (not "hand"), as save_samples names it."""
    from domains.audio.data import sample_index

    domain = AudioDomain(dataset="folder", root=str(tmp_path), sample_rate=4000, duration=0.25)
    domain.label_names = domain.class_names = ["hand", "left_hand", "dog bark"]
    x = torch.rand(4, 1, 1000, generator=torch.Generator().manual_seed(0)) - 0.5
    batch = Batch(x, DenseSpace(tuple(x.shape)), {"label": torch.tensor([1, 0, 2, -1])})
    domain.save_samples(batch, tmp_path / "out")
    index = sample_index(tmp_path / "out", domain.label_names)
    assert [(p.name, label) for p, label in index] == [
        ("samples_000_left_hand.wav", "left_hand"),
        ("samples_001_hand.wav", "hand"),
        ("samples_002_dog-bark.wav", "dog bark"),
        ("samples_003_uncond.wav", None),
    ]
    assert domain.read_samples(tmp_path / "out").cond["label"].tolist() == [1, 0, 2, -1]


def test_evaluate_one_clip_gives_no_metrics_not_an_error(tmp_path, caplog):
    """FID needs a covariance: one clip gives no metrics and a warning, as in the image domain."""
    from polydiff.metrics import classifier_metrics

    class Scorer:  # real metrics on stand-in features
        def score(self, x: torch.Tensor, labels=None) -> dict[str, float]:
            feats, probs = x.flatten(1)[:, :4], torch.full((len(x), 3), 1 / 3)
            return classifier_metrics(feats, probs, torch.randn(10, 4), torch.full((10, 3), 1 / 3), labels)

    domain = AudioDomain(sample_rate=2000, duration=0.5)
    domain.outputs._scorer = Scorer()
    x = torch.rand(2, 1, 1000) - 0.5
    assert "fid" in domain.evaluate(Batch(x, DenseSpace(tuple(x.shape)), {}))
    with caplog.at_level(logging.WARNING):
        assert domain.evaluate(Batch(x[:1], DenseSpace((1, 1, 1000)), {})) == {}
    assert "at least 2 clips" in caplog.text


def test_eval_scores_wav_files_made_elsewhere_like_the_reference_row(tmp_path, monkeypatch):
    """polydiff eval on the held-out clips as files (16 kHz FLAC, resampled on reading) gives the reference
    row's figures; noise WAVs named as polydiff sample names them score far worse, with label accuracy."""
    from polydiff.cli import main

    monkeypatch.setenv("POLYDIFF_CACHE", str(tmp_path / "cache"))
    real = tmp_path / "real"
    with open(SPOKEN_DIGITS_DIR / "metadata.csv") as f:
        for row in csv.DictReader(f):
            if row["split"] == "test":
                (real / row["label"]).mkdir(parents=True, exist_ok=True)
                (real / row["label"] / Path(row["file"]).name).write_bytes(
                    (SPOKEN_DIGITS_DIR / row["file"]).read_bytes()
                )
    noise = tmp_path / "noise"
    noise.mkdir()
    rng = np.random.default_rng(0)
    for i in range(20):
        sf.write(
            noise / f"samples_{i:03d}_{DIGITS[i % 10]}.wav", (0.3 * rng.standard_normal(1400)).astype(np.float32), 2000
        )
    out = tmp_path / "scores.json"
    main(
        [
            "eval",
            str(Path(__file__).resolve().parents[1] / "recipes" / "audio_unet.yaml"),
            str(real),
            str(noise),
            "domain.sample_rate=2000",
            "domain.duration=0.7",
            "domain.classifier_epochs=4",
            "domain.limit=300",
            "--json",
            str(out),
        ]
    )
    record = json.loads(out.read_text())
    (real_row, noise_row), ref = record["samples"], record["reference"]
    assert real_row["n"] == 100 and noise_row["n"] == 20 and ref["num_samples"] == 100
    for key in ("fid", "is", "am", "label_acc"):
        assert real_row["metrics"][key] == pytest.approx(ref[key], rel=1e-4), key
    assert real_row["metrics"]["label_acc"] > 0.8 and noise_row["metrics"]["label_acc"] < 0.5
    assert noise_row["metrics"]["fid"] > 10 * real_row["metrics"]["fid"]


# ------------------------------------------------------------------ training
def test_short_training_run_lowers_the_loss_and_samples_by_label(tmp_path, monkeypatch):
    from polydiff.cli import main
    from polydiff.trainer import train

    monkeypatch.setenv("POLYDIFF_CACHE", str(tmp_path / "cache"))
    cfg = {
        "domain": {"name": "audio", "sample_rate": 1000, "duration": 0.7, "limit": 200, "metrics": False},
        "model": TINY_NET,
        "schedule": {"name": "cosine", "steps": 100},
        "objective": {"prediction": "v", "weighting": "min_snr"},
        "trainer": dict(
            max_steps=40,
            batch_size=16,
            lr=2e-3,
            warmup_steps=5,
            ema_decay=0.9,
            device="cpu",
            ckpt_every=1000,
            num_samples=4,
            log_every=5,
            progress=False,
        ),
        "sampler": {"name": "ddim", "steps": 5},
    }
    run = tmp_path / "run"
    train(cfg, run)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert losses[-1] < 0.8 * losses[0]
    assert (run / "checkpoints" / "last.pt").is_file()
    assert len(list((run / "samples").glob("*.wav"))) == 4
    out = tmp_path / "seven"
    main(["sample", str(run), "--n", "2", "--out", str(out), "sampler.steps=4", "guidance.scale=3", "label=seven"])
    wavs = sorted(out.glob("*.wav"))
    assert [p.name for p in wavs] == ["samples_000_seven.wav", "samples_001_seven.wav"]
    assert sf.info(wavs[0]).samplerate == 1000 and sf.info(wavs[0]).frames == 700
    # Inpainting: a recording is kept outside [0.2 s, 0.4 s), which is generated.
    sf.write(tmp_path / "take.wav", tone(110.0, 1000, 0.7), 1000)
    filled = tmp_path / "filled"
    main(
        [
            "sample",
            str(run),
            "--n",
            "2",
            "--out",
            str(filled),
            "--known",
            str(tmp_path / "take.wav"),
            "known.start=0.2",
            "known.end=0.4",
            "sampler.steps=4",
            "label=seven",
        ]
    )
    take = torch.from_numpy(sf.read(tmp_path / "take.wav", dtype="float32")[0])  # [700]
    assert len(list(filled.glob("*.wav"))) == 2
    for wav in sorted(filled.glob("*.wav")):
        out = torch.from_numpy(sf.read(wav, dtype="float32")[0])
        keep = torch.ones(700, dtype=torch.bool)
        keep[200:400] = False
        assert torch.allclose(out[keep], take[keep], atol=1 / 16384)  # kept, up to 16-bit rounding
        assert (out[~keep] - take[~keep]).abs().max() > 0.05  # generated
    assert json.loads((filled / "sampling.json").read_text())["known"] == {
        "path": str(tmp_path / "take.wav"),
        "start": 0.2,
        "end": 0.4,
    }
    with pytest.raises(SystemExit, match=r"known.start=0.5 and known.end=0.9 must satisfy 0 <= start < end <= 0.7"):
        main(["sample", str(run), "--known", str(tmp_path / "take.wav"), "known.start=0.5", "known.end=0.9"])
    with pytest.raises(SystemExit, match=r"needs known.start=S and/or known.end=E \(seconds, within 0.7\)"):
        main(["sample", str(run), "--known", str(tmp_path / "take.wav")])  # nothing to generate
    with pytest.raises(SystemExit, match="unknown key 'known.stat'"):
        main(["sample", str(run), "--known", str(tmp_path / "take.wav"), "known.stat=0.5"])


def test_eval_split_and_clip_length_are_checked_before_training(tmp_path):
    """Problems that would only surface when scoring after training are named at set-up."""
    for label in ("cat", "dog"):  # one file per label: the automatic test split takes none
        (tmp_path / "single" / label).mkdir(parents=True)
        sf.write(tmp_path / "single" / label / "0.wav", tone(440, 8000, 0.2), 8000)
    domain = AudioDomain(dataset="folder", root=str(tmp_path / "single"), sample_rate=8000, duration=0.2)
    with pytest.raises(ValueError, match=r"'test' split .* is empty.*domain.test_fraction.*domain.metrics=false"):
        domain.setup(domain.dataset("train"))
    quiet = AudioDomain(dataset="folder", root=str(tmp_path / "single"), sample_rate=8000, duration=0.2, metrics=False)
    quiet.setup(quiet.dataset("train"))  # without metrics the split is not needed
    with pytest.raises(ValueError, match=r"domain.duration=0.01 gives 80 samples at 8000 Hz; clips need at least 256"):
        AudioDomain(sample_rate=8000, duration=0.01)
    with pytest.raises(ValueError, match=r"prior.duration=0.001 gives 8 samples"):
        AudioDomain(sample_rate=8000, duration=0.2).prior(2, duration=0.001)


def test_stub_recordings_are_named(tmp_path, caplog):
    (tmp_path / "cat").mkdir()
    sf.write(tmp_path / "cat" / "whole.wav", tone(440, 8000, 0.2), 8000)
    sf.write(tmp_path / "cat" / "stub.wav", tone(440, 8000, 0.004), 8000)  # 32 samples of a 0.2 s clip
    with caplog.at_level(logging.WARNING, logger="domains.audio.io"):
        load_clips(folder_index(tmp_path, "train", test_fraction=0.01), 8000, 1, 1600)
    assert "1 file(s) hold under a tenth" in caplog.text and "stub.wav (0.004 s)" in caplog.text
    assert "whole.wav" not in caplog.text


def test_inpainting_benchmark_runs_on_a_trained_run(tmp_path, monkeypatch):
    """benchmarks/bench_inpainting.py end to end on a tiny run: every row scored, the filled stretch generated."""
    from benchmarks.bench_inpainting import main as bench_inpainting
    from polydiff.trainer import train

    monkeypatch.setenv("POLYDIFF_CACHE", str(tmp_path / "cache"))
    cfg = {
        "domain": {"name": "audio", "sample_rate": 1000, "duration": 0.7, "limit": 200, "classifier_epochs": 2},
        "model": TINY_NET,
        "schedule": {"name": "cosine", "steps": 100},
        "objective": {"prediction": "v"},
        "trainer": dict(max_steps=10, batch_size=16, device="cpu", num_samples=2, progress=False, eval=False),
        "sampler": {"name": "ddim", "steps": 3},
    }
    train(cfg, tmp_path / "run")
    result = bench_inpainting([str(tmp_path / "run"), "--per-label", "1", "--steps", "3"])
    assert list(result) == ["originals", "with the gap", "filled without a label", "filled with the label"]
    assert all(math.isfinite(row["fid"]) and 0 <= row["label_acc"] <= 1 for row in result.values())
    assert result["filled without a label"]["fid"] != result["with the gap"]["fid"]
