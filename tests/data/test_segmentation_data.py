"""SegmentationDataModule and the mask readers: alignment through augmentation, layouts giving identical targets,
bad samples reported or refused."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vit.data.masks import BadSampleError, read_mask, write_mask_folder
from vit.data.sampling import seed_transform
from vit.data.segmentation import SegmentationDataModule, segmentation_train_transform
from vit.data.shapes import make_shape_masks, make_shapes

CLASSES = ["background", "road", "car"]


def _marked_scene(rng) -> tuple[np.ndarray, np.ndarray]:
    """A dark textured image whose class-2 block holds a white 4x4 marker (the block's border keeps bilinear
    blending of the marker inside class 2)."""
    image = rng.integers(0, 50, (40, 56, 3)).astype(np.uint8)
    mask = np.zeros((40, 56), np.uint8)
    mask[20:, :] = 1
    mask[10:26, 30:46] = 2
    image[16:20, 36:40] = 255
    return image, mask


def test_a_marker_pixel_stays_on_its_class_through_every_augmentation():
    transform = segmentation_train_transform(32, resize=None, scale_range=(0.5, 2.0), color_jitter=0.4)
    rng = np.random.default_rng(0)
    seen = 0
    for seed in range(60):
        image, mask = _marked_scene(rng)
        seed_transform(transform, seed)
        out = transform(image=image, mask=mask)
        got_image, got_mask = out["image"], torch.as_tensor(out["mask"])
        assert set(got_mask.unique().tolist()) <= {0, 1, 2, 255}  # nearest-neighbour: no blended labels
        marker = got_image.min(dim=0).values > 0.45  # white after any jitter; the texture stays below 0.3
        if marker.any():
            seen += 1
            assert (got_mask[marker] == 2).all(), f"seed {seed}: the marker left class 2"
        # padding (all-zero image rows/columns at the bottom/right) is ignore in the mask
        pad_rows = (got_image.sum(dim=(0, 2)) == 0).nonzero()
        if len(pad_rows):
            assert (got_mask[int(pad_rows[0]):] == 255).all()
    assert seen >= 20  # the crop keeps the marker often enough for the check to mean something


def _voc_copy(root, samples):
    """The same set as a VOC folder: palette PNG masks (colours unlike the indices), 255 as VOC's boundary."""
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    palette = [200, 10, 10, 10, 200, 10, 10, 10, 200] + [0] * (3 * 252) + [224, 224, 192]
    ids = []
    for i, (image, mask) in enumerate(samples):
        ids.append(f"2007_{i:06d}")
        Image.fromarray(image).save(root / "JPEGImages" / f"{ids[-1]}.png")
        indexed = Image.fromarray(mask, mode="P")
        indexed.putpalette(palette)
        indexed.save(root / "SegmentationClass" / f"{ids[-1]}.png")
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    for split, part in (("train", ids[:4]), ("val", ids[4:])):
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(part) + "\n")


def _tiny_set(n=6, seed=0):
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(n):
        image = rng.integers(0, 255, (20, 28, 3)).astype(np.uint8)
        mask = rng.integers(0, 3, (20, 28)).astype(np.uint8)
        mask[0, :5] = 255
        samples.append((image, mask))
    return samples


def _all_targets(dm, split):
    loader = {"train": dm.train_dataloader, "val": dm.val_dataloader, "test": dm.test_dataloader}[split]()
    return [(images.clone(), masks.clone()) for images, masks in loader]


def test_voc_palette_and_folder_copies_of_one_set_give_identical_targets(tmp_path):
    samples = _tiny_set()
    _voc_copy(tmp_path / "voc", samples)
    write_mask_folder(samples[:4], CLASSES, tmp_path / "folder", "train")
    write_mask_folder(samples[4:], CLASSES, tmp_path / "folder", "val")
    palette_file = next((tmp_path / "voc" / "SegmentationClass").iterdir())
    assert Image.open(palette_file).mode == "P" and read_mask(palette_file).ndim == 2  # indices, never RGB
    modules = [SegmentationDataModule(kind, root=str(tmp_path / kind), batch_size=2, color_jitter=0)
               for kind in ("voc", "folder")]
    for dm in modules:
        dm.setup("fit")
        assert dm.class_names == CLASSES and len(dm.train_set) == 4 and len(dm.val_set) == 2
    for split in ("train", "val"):
        (voc, folder) = (_all_targets(dm, split) for dm in modules)
        for (a_img, a_mask), (b_img, b_mask) in zip(voc, folder, strict=True):
            assert torch.equal(a_img, b_img) and torch.equal(a_mask, b_mask)
    val_masks = torch.cat([m for _, m in _all_targets(modules[0], "val")])
    assert torch.equal(val_masks, torch.as_tensor(np.stack([m for _, m in samples[4:]])).long())


def test_ade20k_reduces_the_zero_label_and_a_missing_val_split_is_carved_from_train(tmp_path):
    root = tmp_path / "ade"
    samples = _tiny_set(n=8)
    write_mask_folder(samples, ["x"], root, "training")
    (root / "masks").rename(root / "annotations")
    (root / "classes.txt").write_text("road\ncar\n")
    dm = SegmentationDataModule("ade20k", root=str(root), batch_size=8, val_fraction=0.25, seed=3)
    dm.setup("fit")
    assert dm.reduce_zero_label and dm.class_names == ["road", "car"]
    assert len(dm.train_set) == 6 and len(dm.val_set) == 2 and dm.test_set is dm.val_set
    names = {s.name for s in dm.val_set.samples}
    again = SegmentationDataModule("ade20k", root=str(root), batch_size=8, val_fraction=0.25, seed=3)
    again.setup("fit")
    assert {s.name for s in again.val_set.samples} == names  # seeded
    _, masks = next(iter(dm.val_dataloader()))
    originals = {f"{i:06d}": m for i, (_, m) in enumerate(samples)}
    first = originals[min(names).rsplit("/", 1)[-1].split(".")[0]].astype(int)
    expected = np.where(first == 0, 255, np.where(first == 255, 255, first - 1))
    assert torch.equal(masks[0], torch.as_tensor(expected).long())


def _corrupt(root, kind):
    mask_path = root / "masks" / "train" / "000001.png"
    image_path = root / "images" / "train" / "000001.png"
    if kind == "size":
        Image.fromarray(np.zeros((5, 7), np.uint8), mode="L").save(mask_path)
        return mask_path, "mask size 7x5 differs from its image's 28x20"
    if kind == "missing":
        mask_path.unlink()
        return mask_path, "mask file not found"
    if kind == "label":
        values = np.zeros((20, 28), np.uint8)
        values[0, 0], values[1, 1] = 7, 9
        Image.fromarray(values, mode="L").save(mask_path)
        return mask_path, "label value(s) [7, 9] are neither a class (0..2) nor the ignore index 255"
    if kind == "unreadable_image":
        image_path.write_bytes(b"not a png")
        return image_path, "unreadable image (not an image Pillow can read)"
    mask_path.write_bytes(b"\x89PNG\r\n broken")
    return mask_path, "unreadable mask"


BAD_KINDS = ["size", "missing", "label", "unreadable_image", "unreadable_mask"]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_each_bad_sample_kind_is_skipped_counted_and_listed(tmp_path, kind):
    root = write_mask_folder(_tiny_set(4), CLASSES, tmp_path / "set", "train")
    write_mask_folder(_tiny_set(2, seed=1), CLASSES, root, "val")
    path, problem = _corrupt(root, kind)
    dm = SegmentationDataModule("folder", root=str(root), batch_size=4)
    dm.setup("fit")
    dm.train_set.skips.path = tmp_path / "run" / "skipped_samples.tsv"
    with pytest.warns(UserWarning, match="skipping"):
        images, masks = next(iter(dm.train_dataloader()))
    assert len(images) == 4 and ((masks < 3) | (masks == 255)).all()
    assert len(dm.skipped_samples) == 1 and dm.skipped_samples[0][0] == str(path)
    assert problem in dm.skipped_samples[0][1]
    lines = (tmp_path / "run" / "skipped_samples.tsv").read_text().splitlines()
    assert lines == [f"{path}\t{dm.skipped_samples[0][1]}"]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_each_bad_sample_kind_is_an_error_naming_the_file_and_values(tmp_path, kind):
    root = write_mask_folder(_tiny_set(4), CLASSES, tmp_path / "set", "train")
    path, problem = _corrupt(root, kind)
    dm = SegmentationDataModule("folder", root=str(root), batch_size=4, on_bad_sample="error")
    dm.setup("fit")
    with pytest.raises(BadSampleError) as err:
        [dm.train_set[i] for i in range(len(dm.train_set))]
    assert str(err.value).startswith(f"bad sample {path}: ") and problem in str(err.value)


def test_shapes_masks_are_the_detection_scenes_with_per_pixel_labels():
    pairs, records = make_shape_masks(6, size=48, seed=2), make_shapes(6, size=48, seed=2)
    for (image, mask), record in zip(pairs, records):
        assert np.array_equal(image, record.image)
        covered = np.zeros_like(mask)
        for (x0, y0, x1, y1), label in zip(record.boxes.astype(int), record.labels):
            inside = mask[y0:y1, x0:x1] == label + 1
            # the box is its shape's extent: the shape touches all four sides
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
            covered[y0:y1, x0:x1][inside] = label + 1
        assert np.array_equal(covered, mask)  # every labelled pixel belongs to a box of its class


def test_data_module_is_seeded_and_refuses_bad_settings(tmp_path):
    first = [SegmentationDataModule("shapes", img_size=32, num_images=16, batch_size=4, seed=1) for _ in range(2)]
    batches = []
    for dm in first:
        dm.setup("fit")
        batches.append(next(iter(dm.train_dataloader())))
    assert torch.equal(batches[0][0], batches[1][0]) and torch.equal(batches[0][1], batches[1][1])
    with pytest.raises(ValueError, match="data.root: required for dataset 'folder'"):
        SegmentationDataModule("folder")
    with pytest.raises(ValueError, match="data.root: the train split 'train' of .* not found"):
        SegmentationDataModule("folder", root=str(tmp_path))
    (tmp_path / "images" / "train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="classes.txt not found"):
        SegmentationDataModule("folder", root=str(tmp_path))
    with pytest.raises(ValueError, match="data.on_bad_sample: expected 'skip' or 'error'"):
        SegmentationDataModule("shapes", on_bad_sample="ignore")
