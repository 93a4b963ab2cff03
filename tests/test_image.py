"""The image domain: loaders, splits, the PNG grid, bad input, metrics, the U-Net and a short run."""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from domains.image import ImageDomain
from domains.image.data import load_cifar10, load_digits_split, load_folder
from domains.image.outputs import grid_layout, make_grid
from polydiff import Batch, get_domain
from polydiff.space import DenseSpace


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


# ---------------------------------------------------------------------------- helpers
def _write(path: Path, mode: str, size: tuple[int, int], color, fmt: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, format=fmt)


def _image_folder(root: Path) -> Path:
    """Two classes of PNG/JPEG files, incl. a grayscale and an RGBA one, of several sizes."""
    _write(root / "cat" / "a.png", "RGB", (20, 12), (255, 0, 0), "PNG")
    _write(root / "cat" / "b.jpg", "RGB", (12, 12), (250, 0, 0), "JPEG")
    _write(root / "cat" / "c.PNG", "L", (16, 16), 255, "PNG")  # grayscale
    _write(root / "dog" / "d.png", "RGBA", (12, 30), (0, 0, 255, 128), "PNG")  # with alpha
    _write(root / "dog" / "e.jpeg", "RGB", (12, 12), (0, 0, 250), "JPEG")
    _write(root / "dog" / "f.png", "RGB", (8, 8), (0, 0, 255), "PNG")
    return root


def _fake_cifar(root: Path, n: int = 6) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": list(rng.integers(0, 10, n))}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"class{i}".encode() for i in range(10)]}, f)
    return folder


# ---------------------------------------------------------------------------- loaders
def test_digits_split_sizes_range_and_stratification():
    train, test = load_digits_split("train"), load_digits_split("test")
    assert len(train.images) + len(test.images) == 1797
    assert len(test.images) == pytest.approx(0.2 * 1797, abs=10)
    assert train.images.shape[1:] == (1, 8, 8)
    x = train.to_tensor()
    assert x.min() == -1.0 and x.max() == 1.0
    # Every label is held out in about the same proportion.
    frac = np.bincount(test.labels, minlength=10) / np.bincount(
        np.concatenate([train.labels, test.labels]), minlength=10
    )
    assert np.all(np.abs(frac - 0.2) < 0.02)
    # Seeded: the same split twice, another seed gives another split.
    assert np.array_equal(load_digits_split("test").images, test.images)
    assert not np.array_equal(load_digits_split("test", seed=1).images, test.images)


def test_folder_loader_labels_modes_and_crop(tmp_path):
    root = _image_folder(tmp_path / "imgs")
    rgb = load_folder(root, "train", size=8, mode="rgb", test_fraction=0.34)
    test = load_folder(root, "test", size=8, mode="rgb", test_fraction=0.34)
    assert rgb.class_names == ["cat", "dog"]
    assert rgb.images.shape[1:] == (3, 8, 8) and rgb.images.dtype == np.uint8
    assert len(rgb.images) + len(test.images) == 6 and sorted(np.bincount(test.labels)) == [1, 1]
    everything = np.concatenate([rgb.images, test.images]).astype(int)
    labels = np.concatenate([rgb.labels, test.labels])
    # Every cat is red or white (the grayscale file), every dog blue (alpha dropped): labels follow folders.
    assert np.all(everything[labels == 0][:, 0] > 200)
    assert np.all(everything[labels == 1][:, 2] > 200) and np.all(everything[labels == 1][:, 0] < 30)
    gray = load_folder(root, "train", size=5, mode="grayscale", test_fraction=0.34)
    assert gray.images.shape[1:] == (1, 5, 5)


def test_exif_orientation_is_applied(tmp_path):
    """A phone photo stored sideways with EXIF orientation 6 (rotate 90 degrees clockwise) is read as displayed."""
    from domains.image.data import read_image

    stored = np.zeros((20, 40), dtype=np.uint8)  # [H, W]: top half white as stored
    stored[:10] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    path = tmp_path / "photo.jpg"
    Image.fromarray(stored).save(path, exif=exif.tobytes(), quality=95)
    arr, _ = read_image(path, 20, "grayscale")  # displayed 20 wide, 40 tall; the centre square
    assert arr.shape == (1, 20, 20)
    assert arr[0, :, :8].mean() < 30 and arr[0, :, 12:].mean() > 225  # the stored top is now the right side
    with pytest.raises(ValueError, match="domain.metric_epochs must be at least 1"):
        ImageDomain(metric_epochs=0)


def test_folder_scales_high_bit_images_and_logs_conversions_once(tmp_path, caplog):
    ramp = np.linspace(0, 1, 64).reshape(8, 8)  # [H, W]
    root = tmp_path / "imgs" / "a"
    root.mkdir(parents=True)
    Image.fromarray((ramp * 65535).astype(np.uint16)).save(root / "0_g16.png")  # mode I;16
    Image.fromarray((ramp * 255).round().astype(np.uint8)).save(root / "1_g8.png")  # the same ramp, mode L
    # A 32-bit TIFF behind a .png name opens as mode I: scaled by the int32 range.
    Image.fromarray((ramp * np.iinfo(np.int32).max).astype(np.int32)).save(root / "2_g32.png", format="TIFF")
    _write(root / "3_pal.png", "P", (8, 8), 3, "PNG")
    _write(root / "4_rgb.png", "RGB", (8, 8), (9, 9, 9), "PNG")
    _write(root / "5_rgba.png", "RGBA", (8, 8), (0, 0, 255, 128), "PNG")
    (root / "notes.txt").write_text("not an image")
    _write(root / "pic.bmp", "RGB", (8, 8), (0, 0, 0), "BMP")
    (root / "._4_rgb.png").write_bytes(b"\x00\x05\x16\x07")  # macOS resource fork: hidden, not read
    with caplog.at_level(logging.INFO):
        rgb = load_folder(tmp_path / "imgs", "train", size=8, mode="rgb", test_fraction=0.01)
    assert len(rgb.images) == 6
    g16, g8, g32 = (rgb.images[i].astype(int) for i in range(3))  # [3, 8, 8]
    assert np.abs(g16 - g8).max() <= 1 and np.abs(g32 - g8).max() <= 1 and g16.min() == 0 and g16.max() == 255
    text = caplog.text
    assert text.count("converted") == 1, text  # one line per data set, not one per file
    assert "converted 5 of 6 images to RGB" in text
    assert "1 I;16 (16-bit, scaled to 8 bits)" in text and "1 I (32-bit, scaled to 8 bits)" in text
    assert "1 L" in text and "1 P" in text and "1 RGBA (alpha dropped)" in text
    assert "skipped 2 file(s) that are not" in text and "notes.txt" in text and "pic.bmp" in text
    gray = load_folder(tmp_path / "imgs", "train", size=8, mode="grayscale", test_fraction=0.01)
    assert np.abs(gray.images[0].astype(int) - gray.images[1]).max() <= 1 and gray.images[0].max() == 255


def test_folder_reads_images_nested_below_class_folders(tmp_path):
    _write(tmp_path / "a" / "1.png", "RGB", (9, 9), (10, 10, 10), "PNG")
    _write(tmp_path / "a" / "batch2" / "2.png", "RGB", (9, 9), (20, 20, 20), "PNG")  # nested: still class 'a'
    _write(tmp_path / "b" / "2019" / "05" / "3.png", "RGB", (9, 9), (30, 30, 30), "PNG")  # only nested images
    _write(tmp_path / "b" / ".thumbs" / "4.png", "RGB", (9, 9), (99, 99, 99), "PNG")  # hidden folder: skipped
    data = load_folder(tmp_path, "train", size=4, test_fraction=0.01)
    assert data.class_names == ["a", "b"]
    pairs = sorted(zip(data.images[:, 0, 0, 0].tolist(), data.labels.tolist()))
    assert pairs == [(10, 0), (20, 0), (30, 1)]


def test_folder_train_test_subfolders(tmp_path):
    _write(tmp_path / "train" / "a" / "1.png", "RGB", (9, 9), (10, 10, 10), "PNG")
    _write(tmp_path / "train" / "b" / "2.png", "RGB", (9, 9), (20, 20, 20), "PNG")
    _write(tmp_path / "test" / "a" / "3.png", "RGB", (9, 9), (30, 30, 30), "PNG")
    _write(tmp_path / "test" / "b" / "4.png", "RGB", (9, 9), (40, 40, 40), "PNG")
    assert len(load_folder(tmp_path, "train", size=4).images) == 2
    assert load_folder(tmp_path, "test", size=4).images[:, 0, 0, 0].tolist() == [30, 40]


def test_unlabelled_folder_is_unconditional_only(tmp_path):
    for i in range(4):
        _write(tmp_path / f"{i}.png", "RGB", (6, 6), (i * 50, 0, 0), "PNG")
    arr = load_folder(tmp_path, "train", size=6, test_fraction=0.25)
    assert arr.labels is None and len(arr.images) == 3
    with pytest.raises(ValueError, match="conditional"):
        ImageDomain(source="folder", root=str(tmp_path), size=6).dataset("train")
    dom = ImageDomain(source="folder", root=str(tmp_path), size=6, conditional=False, test_fraction=0.25)
    batch = dom.collate([dom.dataset("train")[i] for i in range(3)])
    assert batch.cond == {} and batch.x.shape == (3, 3, 6, 6)


def test_cifar_loader_and_missing_copy(tmp_path):
    folder = _fake_cifar(tmp_path)
    train, test = load_cifar10(tmp_path, "train"), load_cifar10(folder, "test")
    assert train.images.shape == (30, 3, 32, 32) and test.images.shape == (6, 3, 32, 32)
    assert train.class_names[3] == "class3" and train.max_value == 255
    # Row layout: 1024 red values, then green, then blue.
    with open(folder / "test_batch", "rb") as f:
        raw = pickle.load(f)[b"data"]
    assert np.array_equal(test.images[0, 1], raw[0, 1024:2048].reshape(32, 32))
    with pytest.raises(FileNotFoundError, match=r"cifar-10-batches-py.*data_batch_1"):
        load_cifar10(tmp_path / "nowhere", "train")
    (folder / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        load_cifar10(tmp_path, "train")


def test_a_cifar_file_that_names_code_is_refused_unrun(tmp_path):
    """A CIFAR-10 batch is a pickle: one from someone else may name code, which reading it must never run."""
    folder = _fake_cifar(tmp_path)
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (Path.write_text, (marker, "x"))

    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [Payload()]}, f)
    with pytest.raises(ValueError, match=r"batches.meta.*pathlib.*write_text"):
        load_cifar10(tmp_path, "test")
    assert not marker.exists()
    with open(folder / "test_batch", "wb") as f:  # numpy 1's array layout (protocol 2) still reads
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [np.int64(1), 2]}, f, protocol=2)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [b"a", b"b"]}, f, protocol=2)
    assert load_cifar10(tmp_path, "test").labels.tolist() == [1, 2]


# ---------------------------------------------------------------------------- bad input
def test_corrupt_image_names_the_file(tmp_path):
    root = _image_folder(tmp_path / "imgs")
    bad = root / "dog" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(ValueError, match="broken.png"):
        load_folder(root, "train", size=8, test_fraction=0.01)


def test_empty_folders_name_the_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty.*holds no images"):
        load_folder(tmp_path / "empty", "train", size=8)
    root = _image_folder(tmp_path / "imgs")
    (root / "bird").mkdir()
    with pytest.raises(ValueError, match="bird holds no images"):
        load_folder(root, "train", size=8)
    with pytest.raises(FileNotFoundError, match="missing"):
        load_folder(tmp_path / "missing", "train", size=8)


def test_a_data_source_is_a_row_of_the_table(monkeypatch):
    """A new source is a loader in ``SOURCES`` with its fixed size; the domain reads it like the shipped ones."""
    from domains.image.data import SOURCES, ImageArrays, ImageSource

    def squares(root, split, size, mode, fraction, seed):
        images = np.arange(2 * 3 * 4 * 4, dtype=np.uint8).reshape(2, 3, 4, 4)
        return ImageArrays(images, np.array([0, 1]), ["dark", "light"], max_value=95)

    monkeypatch.setitem(SOURCES, "squares", ImageSource(squares, size=4, needs_root=False))
    with pytest.raises(ValueError, match="domain.size=8 is not available for source 'squares'"):
        ImageDomain(source="squares", size=8)
    dom = ImageDomain(source="squares")
    dom.setup(dom.dataset("train"))
    assert dom.sample_shape == (3, 4, 4) and dom.class_names == ["dark", "light"]
    assert dom.collate([dom.dataset("test")[1]]).x.max() == 1.0


def test_bad_domain_settings():
    with pytest.raises(ValueError, match=r"'imagenet' is unknown; choose one of \['digits', 'folder', 'cifar10'\]"):
        ImageDomain(source="imagenet")
    with pytest.raises(ValueError, match="domain.size"):
        ImageDomain(source="digits", size=16)
    with pytest.raises(ValueError, match="domain.root"):
        ImageDomain(source="cifar10")
    dom = ImageDomain()
    dom.setup(dom.dataset("train"))
    with pytest.raises(KeyError, match="model.chanels"):
        dom.build_network(chanels=8)
    with pytest.raises(KeyError, match="model.in_channels"):
        dom.build_network(in_channels=3)
    with pytest.raises(ValueError, match="unknown label"):
        dom.parse_label("eleven")
    assert dom.parse_label("7") == 7


# ---------------------------------------------------------------------------- outputs
def test_grid_png_one_row_per_label(tmp_path):
    dom = get_domain("image")()
    assert isinstance(dom, ImageDomain)
    dom.setup(dom.dataset("train"))
    labels = torch.tensor([3, 1, 3, 1, 3, 7])
    x = torch.linspace(-1, 1, 6).view(6, 1, 1, 1).expand(6, 1, 8, 8).contiguous()
    paths = dom.save_samples(Batch(x, DenseSpace(tuple(x.shape)), {"label": labels}), tmp_path, "grid")
    png = next(p for p in paths if p.suffix == ".png")
    img = Image.open(png)
    img.verify()  # a valid PNG
    img = np.asarray(Image.open(png))
    up, pad = 4, 1  # 8x8 tiles zoomed to 32 px
    # 3 labels -> 3 rows; the longest row (label 3) has 3 samples.
    assert img.shape == (3 * (8 * up + pad) + pad, 3 * (8 * up + pad) + pad)
    # Row 0 holds label 1: samples 1 and 3, in order; its third cell is empty (black).
    cell = lambda r, c: img[pad + r * (8 * up + pad) + 5, pad + c * (8 * up + pad) + 5]  # noqa: E731
    expected = ((x[[1, 3], 0, 0, 0] + 1) * 127.5).round().to(torch.uint8).tolist()
    assert [cell(0, 0), cell(0, 1)] == expected and cell(0, 2) == 0
    saved = torch.load(tmp_path / "grid.pt", weights_only=True)
    assert torch.equal(saved["x"], x) and torch.equal(saved["label"], labels)


def test_unconditional_grid_is_square_and_rgb():
    rows = grid_layout(None, 10)
    assert [len(r) for r in rows] == [4, 4, 2]
    assert grid_layout(torch.full((10,), 3), 10) == rows  # one label: no 10-wide strip
    grid = make_grid(torch.zeros(10, 3, 5, 6), rows, upscale=2, pad=2)
    assert grid.shape == (3 * 12 + 2, 4 * 14 + 2, 3)


# ---------------------------------------------------------------------------- metrics
def test_metrics_real_digits_beat_noise(tmp_path, monkeypatch):
    monkeypatch.setenv("POLYDIFF_CACHE", str(tmp_path))
    dom = ImageDomain(metric_epochs=6)
    dom.setup(dom.dataset("train"))
    ref = dom.reference_metrics(200)
    test = dom.arrays("test")
    noise = torch.rand(200, 1, 8, 8) * 2 - 1
    labels = torch.from_numpy(test.labels[:200])
    fake = dom.evaluate(Batch(noise, DenseSpace(tuple(noise.shape)), {"label": labels}))
    assert ref["label_acc"] > 0.9 and fake["label_acc"] < 0.3
    assert ref["fid"] < fake["fid"] / 5
    assert ref["is"] > 2 * fake["is"]
    assert {"mis", "am"} <= set(ref)
    assert list(tmp_path.glob("image-classifier-*.pt")), "fitted classifier weights are cached"


# ---------------------------------------------------------------------------- network and training
def test_unet_keeps_the_sample_shape():
    dom = ImageDomain()
    dom.setup(dom.dataset("train"))
    net = dom.build_network(channels=16, channel_mults=(1, 2), num_res_blocks=1, mid_attention=False)
    space, cond = dom.prior(3, torch.tensor([0, 9, -1]))
    x = space.randn()
    assert net(x, torch.rand(3), **cond).shape == (3, *dom.sample_shape) == (3, 1, 8, 8)
    # state_dict round-trip: a fresh domain samples without the data.
    fresh = ImageDomain()
    fresh.load_state_dict(dom.state_dict())
    assert fresh.prior(2)[0].shape == (2, 1, 8, 8) and fresh.num_classes == 10


def test_recipe_trains_lowers_loss_and_samples_grids(tmp_path, monkeypatch, capsys):
    from polydiff.cli import main
    from polydiff.recipes import compose_recipe
    from polydiff.trainer import train

    monkeypatch.setenv("POLYDIFF_CACHE", str(tmp_path / "cache"))
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "image_unet.yaml"
    cfg = compose_recipe(
        recipe,
        [
            "profile=cpu",
            "model.channels=16",
            "trainer.max_steps=80",
            "trainer.batch_size=32",
            "trainer.log_every=10",
            "trainer.num_samples=20",
            "trainer.eval=false",
            "trainer.progress=false",
            "sampler.steps=5",
        ],
    )
    run = tmp_path / "run"
    train(cfg, run)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(losses) == 8 and losses[-1] < 0.6 * losses[0]
    grid = np.asarray(Image.open(run / "samples" / "step_0000080.png"))
    assert grid.shape == (10 * 33 + 1, 2 * 33 + 1)  # 20 samples, labels 0..9 twice: 10 rows of 2
    main(["sample", str(run), "--n", "10", "--out", str(tmp_path / "new"), "sampler.steps=3", "label=4", "--eval"])
    new = np.asarray(Image.open(tmp_path / "new" / "samples.png"))
    assert new.shape == (3 * 33 + 1, 4 * 33 + 1)  # one label: a square-ish grid, rows of 4, 4, 2
    # --eval scores the samples and, beside them, as many held-out real images (the reference row).
    record = json.loads((tmp_path / "new" / "sampling.json").read_text())
    assert {"fid", "is", "label_acc"} <= set(record["metrics"]) and record["reference"]["num_samples"] == 10
    assert record["reference"]["fid"] != record["metrics"]["fid"]
    out = capsys.readouterr().out
    assert "wrote 3 files to" in out and "real data: fid" in out


def test_read_samples_from_image_files_and_saved_tensors(tmp_path, monkeypatch):
    """polydiff eval reads images made elsewhere (PNG per image, label sub-folders) and the .pt save_samples writes."""
    monkeypatch.setenv("POLYDIFF_CACHE", str(tmp_path / "cache"))
    dom = ImageDomain(metric_epochs=3)
    dom.setup(dom.dataset("train"))
    test = dom.arrays("test")
    x = test.to_tensor()[:120]  # [120, 1, 8, 8] in [-1, 1]
    labels = torch.from_numpy(test.labels[:120])
    for i, (img, y) in enumerate(zip(test.images[:120], test.labels[:120])):  # 0..16 -> 8-bit PNGs
        (tmp_path / "png" / dom.class_names[y]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.round(img[0].astype(np.float64) * 255 / 16).astype(np.uint8)).save(
            tmp_path / "png" / dom.class_names[y] / f"{i:03d}.png"
        )
    back = dom.read_samples(tmp_path / "png")
    order = back.cond["label"].argsort(stable=True)  # files are read folder by folder
    assert back.x.shape == x.shape and (back.cond["label"][order] == labels[labels.argsort(stable=True)]).all()
    assert torch.allclose(back.x[order], x[labels.argsort(stable=True)], atol=1.5 / 255)  # half an 8-bit level
    original = dom.evaluate(Batch(x, DenseSpace(tuple(x.shape)), {"label": labels}))
    scored = dom.evaluate(back)
    assert scored["label_acc"] == pytest.approx(original["label_acc"], abs=0.02)
    assert scored["fid"] == pytest.approx(original["fid"], rel=0.1, abs=0.5)
    dom.save_samples(Batch(x, DenseSpace(tuple(x.shape)), {"label": labels}), tmp_path / "pt")
    again = dom.read_samples(tmp_path / "pt" / "samples.pt")
    assert torch.equal(again.x, x) and torch.equal(again.cond["label"], labels)
    (tmp_path / "big").mkdir()
    torch.save({"x": torch.zeros(3, 1, 16, 16), "step": torch.tensor(5)}, tmp_path / "big" / "s.pt")  # a 0-d entry too
    with pytest.raises(ValueError, match=r"s.pt have shape \(1, 16, 16\), the domain's are \(1, 8, 8\)"):
        dom.read_samples(tmp_path / "big")


def _folder_domain(tmp_path: Path) -> ImageDomain:
    """A set-up folder domain (classes cat, dog; 8x8 RGB) on :func:`_image_folder`'s images."""
    dom = ImageDomain(source="folder", root=str(_image_folder(tmp_path / "data")), size=8)
    dom.setup(dom.dataset("train"))
    return dom


def test_unrelated_pt_file_does_not_hide_the_images_of_a_samples_folder(tmp_path, caplog):
    dom = _folder_domain(tmp_path)
    samples = _image_folder(tmp_path / "samples")
    torch.save({"latents": torch.zeros(2, 4)}, samples / "latents.pt")  # someone else's tensors beside the images
    back = dom.read_samples(samples)
    assert back.num_samples == 6 and back.x.shape == (6, 3, 8, 8) and back.cond["label"].tolist() == [0, 0, 0, 1, 1, 1]
    x = torch.rand(4, 3, 8, 8) * 2 - 1
    own = Batch(x, DenseSpace(tuple(x.shape)), {"label": torch.tensor([0, 1, 0, 1])})
    for seed in ("seed0", "seed1"):  # polydiff's own: samples.png (the grid) beside samples.pt, a folder per seed
        dom.save_samples(own, tmp_path / "run" / seed)
    torch.save({"latents": torch.zeros(2, 4)}, tmp_path / "run" / "latents.pt")
    _write(tmp_path / "run" / "other.png", "RGB", (8, 8), (0, 0, 0), "PNG")
    with caplog.at_level(logging.WARNING):
        back = dom.read_samples(tmp_path / "run")
    assert torch.equal(back.x, torch.cat([x, x])) and back.cond["label"].tolist() == [0, 1, 0, 1] * 2
    assert "ignored 1 other image(s)" in caplog.text and "other.png" in caplog.text


def test_eval_labels_by_the_first_folder_level_as_training_does(tmp_path):
    """Training counts cat/seed0/x.png as class cat; eval of sample folders must read the same label."""
    _write(tmp_path / "data" / "cat" / "seed0" / "a.png", "RGB", (8, 8), (255, 0, 0), "PNG")
    _write(tmp_path / "data" / "dog" / "b.png", "RGB", (8, 8), (0, 0, 255), "PNG")
    train = load_folder(tmp_path / "data", "train", size=8, test_fraction=0.01)
    assert train.class_names == ["cat", "dog"] and train.labels.tolist() == [0, 1]
    dom = ImageDomain(source="folder", root=str(tmp_path / "data"), size=8, test_fraction=0.01)
    dom.setup(dom.dataset("train"))
    for rel in ("cat/seed0/x.png", "dog/seed1/y.png", "seed2/cat/z.png", "w.png"):
        _write(tmp_path / "samples" / rel, "RGB", (8, 8), (9, 9, 9), "PNG")
    back = dom.read_samples(tmp_path / "samples")
    assert back.cond["label"].tolist() == [0, 1, -1, -1]  # seed2/cat/: the first level is no class name


def test_folder_split_names_val_is_held_out_and_a_lone_train_is_refused(tmp_path):
    for split, shade in (("train", 10), ("val", 30)):
        for label in ("a", "b"):
            _write(tmp_path / "tv" / split / label / "1.png", "RGB", (9, 9), (shade, shade, shade), "PNG")
    train = load_folder(tmp_path / "tv", "train", size=4)
    assert train.class_names == ["a", "b"] and train.images[:, 0, 0, 0].tolist() == [10, 10]  # not classes train/val
    assert load_folder(tmp_path / "tv", "test", size=4).images[:, 0, 0, 0].tolist() == [30, 30]
    _write(tmp_path / "lone" / "train" / "a" / "1.png", "RGB", (9, 9), (10, 10, 10), "PNG")
    with pytest.raises(ValueError, match=r"holds split folders \['train'\]: give it train/ and one held-out folder"):
        load_folder(tmp_path / "lone", "train", size=4)


def test_sample_and_eval_after_the_data_moved(tmp_path, monkeypatch, capsys):
    """Metrics need the training data (the classifier): moved data are named, and domain.root=NEW points at them."""
    from polydiff.cli import main
    from polydiff.trainer import train

    monkeypatch.setenv("POLYDIFF_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    for label, base in (("dark", 40), ("light", 200)):
        for i in range(12):
            pixels = np.clip(base + rng.normal(0, 10, (8, 8)), 0, 255).astype(np.uint8)
            (tmp_path / "data" / label).mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(tmp_path / "data" / label / f"{i}.png")
    cfg = {
        "domain": {
            "name": "image",
            "source": "folder",
            "root": str(tmp_path / "data"),
            "size": 8,
            "mode": "grayscale",
            "test_fraction": 0.25,
            "metric_epochs": 2,
        },
        "model": {"channels": 8, "channel_mults": [1, 2], "num_res_blocks": 1, "attention_levels": []},
        "schedule": {"name": "cosine", "steps": 50},
        "trainer": dict(max_steps=4, batch_size=8, device="cpu", num_samples=4, progress=False, eval=False),
        "sampler": {"name": "ddim", "steps": 3},
    }
    run = tmp_path / "run"
    train(cfg, run)
    (tmp_path / "data").rename(tmp_path / "moved")
    with pytest.raises(SystemExit, match="Score them later with polydiff eval") as err:
        main(["sample", str(run), "--n", "4", "--eval", "--out", str(tmp_path / "s1")])
    assert str(tmp_path / "data") in str(err.value) and (tmp_path / "s1" / "samples.pt").is_file()
    main(["sample", str(run), "--n", "4", "--eval", "--out", str(tmp_path / "s2"), f"domain.root={tmp_path / 'moved'}"])
    record = json.loads((tmp_path / "s2" / "sampling.json").read_text())
    assert {"fid", "is", "label_acc"} <= set(record["metrics"]) and record["reference"]["num_samples"] == 4
    main(
        [
            "eval",
            str(run),
            str(tmp_path / "s1"),
            f"domain.root={tmp_path / 'moved'}",
            "--json",
            str(tmp_path / "e.json"),
        ]
    )
    scored = json.loads((tmp_path / "e.json").read_text())
    assert scored["samples"][0]["n"] == 4 and "fid" in scored["samples"][0]["metrics"] and scored["reference"]
    main(["sample", str(run), "--n", "3", "--seeds", "2", "--out", str(tmp_path / "seeds")])  # a folder per seed
    main(
        [
            "eval",
            str(run),
            str(tmp_path / "seeds"),
            f"domain.root={tmp_path / 'moved'}",
            "--no-reference",
            "--json",
            str(tmp_path / "seeds.json"),
        ]
    )
    assert json.loads((tmp_path / "seeds.json").read_text())["samples"][0]["n"] == 6  # the tensors, not the grids
    # Inpainting: an image is kept outside known.box, which is generated.
    photo = tmp_path / "moved" / "light" / "0.png"
    main(
        [
            "sample",
            str(run),
            "--n",
            "3",
            "--out",
            str(tmp_path / "inpaint"),
            "--known",
            str(photo),
            "known.box=[2,1,6,7]",
        ]
    )
    x = torch.load(tmp_path / "inpaint" / "samples.pt", weights_only=True)["x"]  # [3, 1, 8, 8]
    kept = torch.from_numpy(np.asarray(Image.open(photo), dtype=np.float32)) / 127.5 - 1  # [8, 8]
    box = torch.zeros(8, 8, dtype=torch.bool)
    box[1:7, 2:6] = True
    assert torch.allclose(x[:, 0][:, ~box], kept[~box].expand(3, -1), atol=1e-6)
    assert (x[:, 0][:, box] - kept[box]).abs().max() > 0.05
    with pytest.raises(SystemExit, match=r"known.box=\[2, 1, 9, 7\] lies outside the 8x8 images"):
        main(["sample", str(run), "--known", str(photo), "known.box=[2,1,9,7]"])


def test_metric_classifier_cache_file_of_the_digits_is_pinned(monkeypatch):
    """Cached classifiers (and the figures they gave) stay valid: the digits' default cache file name is fixed."""
    from domains.image import metrics

    seen = {}

    def capture(make_net, train, heldout, cache, fit_kwargs, device=None):
        seen.update(cache=cache, fit_kwargs=fit_kwargs)

    monkeypatch.setattr(metrics, "cached_scorer", capture)
    monkeypatch.setenv("POLYDIFF_CACHE", "/cache")
    ImageDomain().outputs.scorer()
    assert seen["cache"] == Path("/cache/image-classifier-930160400010d9f2.pt")
    assert seen["fit_kwargs"] == {"epochs": 15, "batch_size": 64, "lr": 3e-3, "augment": metrics.random_shift}
