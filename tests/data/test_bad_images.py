"""Messy image folders: every kind of bad or odd file, skip vs error, scan cache, random bytes (hypothesis)."""
import io
import warnings

import numpy as np
import pytest
from conftest import write_image_folder
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from vit.data import ImageDataModule, load_image
from vit.data.folder import FileDataset
from vit.data.images import BadImageError, check_image


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VIT_CACHE_DIR", str(tmp_path / "cache"))


def _png_bytes(mode="RGB", size=(20, 12), **save):
    buf = io.BytesIO()
    Image.new(mode, size, 128 if mode in ("L", "P", "I;16", "I") else (200,) * len(mode)).save(
        buf, "TIFF" if mode == "CMYK" else "PNG", **save)
    return buf.getvalue()


def messy_folder(root):
    write_image_folder(root, classes=("cat", "dog", "empty"), per_class=4)
    for split in ("train", "val"):
        for f in (root / split / "empty").iterdir():
            f.unlink()
    cat = root / "train" / "cat"
    (cat / "zero.png").write_bytes(b"")
    (cat / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    (cat / "truncated.png").write_bytes(_png_bytes()[:60])
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (10, 20, 30)).save(buf, "JPEG")
    (cat / "truncated.jpg").write_bytes(buf.getvalue()[:-200])
    (cat / "notes.txt").write_text("hello")
    (cat / ".DS_Store").write_bytes(b"\0\1")
    (cat / "Thumbs.db").write_bytes(b"\0\1")
    (cat / ".hidden").mkdir()
    (cat / ".hidden" / "x.png").write_bytes(b"junk")
    (root / "train" / ".git").mkdir()
    (cat / "ünïcode name ✓.png").write_bytes(_png_bytes())
    (cat / "palette.png").write_bytes(_png_bytes("P"))
    (cat / "la.png").write_bytes(_png_bytes("LA"))
    (cat / "rgba.png").write_bytes(_png_bytes("RGBA"))
    (cat / "sixteen.png").write_bytes(_png_bytes("I;16"))
    (cat / "cmyk.tif").write_bytes(_png_bytes("CMYK"))
    (root / "val" / "bird").mkdir()
    (root / "val" / "bird" / "0.png").write_bytes(_png_bytes())
    return root


def test_skip_mode_leaves_out_bad_files_with_one_warning_and_correct_labels(tmp_path):
    root = messy_folder(tmp_path / "images")
    dm = ImageDataModule("imagefolder", root=str(root), img_size=16, batch_size=4)
    assert dm.class_names == ["cat", "dog", "empty"]
    with pytest.warns(UserWarning) as record:
        dm.setup("fit")
    skipped = dict(dm.skipped_images)
    names = {p.rsplit("/", 1)[-1]: reason for p, reason in skipped.items()}
    assert set(names) == {"zero.png", "corrupt.jpg", "truncated.png", "truncated.jpg", "0.png"}
    assert "empty" in names["zero.png"] and "truncated" in names["truncated.jpg"].lower()
    assert "bird" in skipped[str(root / "val" / "bird" / "0.png")]  # class in val but not in train
    messages = [str(w.message) for w in record]
    assert sum("skipped 5" in m for m in messages) == 1 and any("'empty'" in m for m in messages)
    train = {p.rsplit("/", 1)[-1]: label for p, label in dm.train_set.samples}
    for name in ("ünïcode name ✓.png", "palette.png", "la.png", "rgba.png", "sixteen.png", "cmyk.tif"):
        assert train[name] == 0  # cat, never another class
    assert not any(".hidden" in p or p.endswith((".txt", "Thumbs.db")) for p, _ in dm.train_set.samples)
    for i in range(len(dm.train_set)):
        image, label = dm.train_set[i]
        assert image.shape == (3, 16, 16) and label in (0, 1)


def test_error_mode_names_the_file_and_reason(tmp_path):
    root = messy_folder(tmp_path / "images")
    dm = ImageDataModule("imagefolder", root=str(root), img_size=16, on_bad_image="error")
    with pytest.raises(BadImageError) as err:
        dm.setup("fit")
    assert err.value.path.startswith(str(root)) and "on_bad_image" in str(err.value)


def test_skip_list_written_to_run_directory(tmp_path, monkeypatch):
    from vit.training.cli import DEFAULT_CONFIG, main
    root = messy_folder(tmp_path / "images")
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main(["fit", "--config", str(DEFAULT_CONFIG.parent / "imagefolder.yaml"), "--data.root", str(root),
              "--data.batch_size", "8", "--data.num_workers", "0", "--trainer.max_epochs", "1",
              "--trainer.enable_progress_bar", "false", "--model.backbone.arch", "null", "--model.backbone.embed_dim", "32",
              "--model.backbone.depth", "1", "--model.backbone.num_heads", "2", "--model.backbone.patch_size", "8", "--data.img_size", "16"])
    log = next((tmp_path / "runs").rglob("skipped_images.tsv")).read_text(encoding="utf-8").splitlines()
    assert len(log) == 5 and all("\t" in line for line in log)


def test_decode_failure_after_scan_is_replaced_by_next_file_or_raises(tmp_path):
    good = tmp_path / "good.png"
    good.write_bytes(_png_bytes())
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"garbage")
    log = tmp_path / "skipped.tsv"
    data = FileDataset([(str(bad), 0), (str(good), 1)], on_bad_image="skip", skip_log=log)
    with pytest.warns(UserWarning, match="bad.png"):
        image, label = data[0]
    assert label == 1 and image.shape == (12, 20, 3) and "bad.png" in log.read_text()
    with pytest.raises(BadImageError, match="bad.png"):
        FileDataset([(str(bad), 0)])[0]


def test_exif_rotation_and_modes_give_hwc_uint8(tmp_path):
    img = Image.new("RGB", (30, 10), (255, 0, 0))
    exif = img.getexif()
    exif[0x0112] = 6  # rotated 90 degrees: stored 30x10, shown 10x30
    img.save(tmp_path / "rot.jpg", exif=exif)
    assert load_image(tmp_path / "rot.jpg").shape == (30, 10, 3)
    for mode in ("P", "LA", "RGBA", "I;16", "L"):
        (tmp_path / f"{mode}.png").write_bytes(_png_bytes(mode))
        arr = load_image(tmp_path / f"{mode}.png")
        assert arr.shape == (12, 20, 3) and arr.dtype == np.uint8
    assert load_image(tmp_path / "L.png", in_chans=1).shape == (12, 20, 1)


def test_decompression_bomb_is_a_clear_reason(tmp_path, monkeypatch):
    (tmp_path / "big.png").write_bytes(_png_bytes(size=(200, 200)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    assert "MAX_IMAGE_PIXELS" in check_image(tmp_path / "big.png")
    with pytest.raises(BadImageError, match="decompression-bomb"):
        load_image(tmp_path / "big.png")


def test_scan_is_cached_per_folder(tmp_path, monkeypatch):
    import vit.data.folder as folder
    root = write_image_folder(tmp_path / "images", per_class=3)
    calls = []
    real = folder.check_image
    monkeypatch.setattr(folder, "check_image", lambda p: calls.append(p) or real(p))
    ImageDataModule("imagefolder", root=str(root)).setup("fit")
    assert len(calls) == 12
    ImageDataModule("imagefolder", root=str(root)).setup("fit")
    assert len(calls) == 12  # unchanged files: nothing opened again
    (root / "train" / "cat" / "0.png").write_bytes(b"")
    with pytest.warns(UserWarning, match="skipped 1"):
        ImageDataModule("imagefolder", root=str(root)).setup("fit")
    assert len(calls) == 13


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(st.binary(max_size=300),
                      st.builds(lambda cut, raw: raw[:cut], st.integers(0, 400), st.just(_png_bytes())),
                      st.builds(lambda b, i, raw: raw[:i] + b + raw[i + len(b):], st.binary(min_size=1, max_size=8),
                                st.integers(0, 300), st.just(_png_bytes()))))
def test_random_bytes_give_an_image_or_bad_image_error(tmp_path, data):
    path = tmp_path / "x.png"
    path.write_bytes(data)
    reason = check_image(path)
    assert reason is None or isinstance(reason, str)
    try:
        arr = load_image(path)
    except BadImageError as err:
        assert err.path == str(path) and err.reason
    else:
        assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3
