"""litdata shards (``data.dataset: streaming``): ``vit shards`` on small image folders, then
training from the chunks through ImageDataModule, a Trainer and the CLI; damaged and missing chunks; offline."""
import hashlib
import json
import shutil
import warnings

import lightning as L
import pytest
import torch
from conftest import QUICK, assert_loss_fell, logged_losses, write_image_folder

from vit.data import ImageDataModule
from vit.data.images import BadImageError

litdata = pytest.importorskip("litdata")

from vit.commands.shards import main  # noqa: E402
from vit.data import shards as convert_module  # noqa: E402  (needs litdata)
from vit.data.shards import convert  # noqa: E402
from vit.data.streaming import ShardError  # noqa: E402

CLASSES = ["ant", "bee", "cow"]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VIT_CACHE_DIR", str(tmp_path / "cache"))


def _source(root, splits=("train", "val", "test")):
    """6 images per class in train, 2 in val and test, and one empty file in train (skipped)."""
    write_image_folder(root, classes=CLASSES, per_class=6, splits=("train",), size=20)
    for split in splits[1:]:
        write_image_folder(root, classes=CLASSES, per_class=2, splits=(split,), size=20, seed=1)
    (root / "train" / "bee" / "empty.png").write_bytes(b"")
    return root


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """A source with train/val/test converted once for the module (converting starts writer processes)."""
    tmp = tmp_path_factory.mktemp("shards")
    src = _source(tmp / "src")
    with pytest.MonkeyPatch.context() as patch, pytest.warns(UserWarning, match="skipped 1 unusable"):
        patch.setenv("VIT_CACHE_DIR", str(tmp / "cache"))
        assert main([str(src), str(tmp / "out"), "--workers", "1", "--chunk-bytes", "4KB"]) == 0
    meta = json.loads((tmp / "out" / "vit_dataset.json").read_text())
    return src, tmp / "out", meta


def _raw(split_dir):
    """Every stored sample of a converted split, in stored order, read by litdata itself."""
    data = litdata.StreamingDataset(str(split_dir))
    return [data[i] for i in range(len(data))]


def test_convert_stores_bytes_labels_classes_and_reports_skips(shards):
    src, out, meta = shards
    assert meta["classes"] == CLASSES and json.loads((out / "vit_dataset.json").read_text()) == meta
    assert {split: info["count"] for split, info in meta["splits"].items()} == {"train": 18, "val": 6, "test": 6}
    assert meta["splits"]["train"]["per_class"] == [6, 6, 6]
    assert (out / "skipped_images.tsv").read_text().startswith(str(src / "train" / "bee" / "empty.png"))
    samples = _raw(out / "train")
    paths = [s["path"] for s in samples]
    assert len(set(paths)) == 18 and paths != sorted(paths)  # each file once, shuffled before writing
    for s in samples:
        assert CLASSES[s["label"]] == s["path"].split("/")[0]  # the label is the class folder's
        assert s["image"] == (src / "train" / s["path"]).read_bytes()  # the original encoded bytes
    assert len(list((out / "train").glob("chunk-*.bin"))) > 1


def test_trains_a_few_steps_from_shards(shards, tmp_path):
    from vit.tasks.backbone import Backbone
    from vit.tasks.classification import ImageClassifier
    _, out, _ = shards
    dm = ImageDataModule("streaming", root=str(out), img_size=16, batch_size=4)
    assert dm.class_names == CLASSES and dm.num_classes == 3  # from the metadata, before loading
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (18, 6, 6)
    loader = dm.train_dataloader()
    epochs = [torch.cat([y for _, y in loader]) for _ in range(2)]
    assert [len(e) for e in epochs] == [18, 18] and all(sorted(e.tolist()) == [0] * 6 + [1] * 6 + [2] * 6
                                                         for e in epochs)
    assert not torch.equal(epochs[0], epochs[1])  # reshuffled each epoch
    images, labels = next(iter(dm.val_dataloader()))
    assert images.shape == (4, 3, 16, 16) and images.dtype == torch.float32
    module = ImageClassifier(Backbone(img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2), num_classes=3,
                             class_names=dm.class_names)
    trainer = L.Trainer(max_epochs=2, limit_train_batches=3, limit_val_batches=2, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, datamodule=ImageDataModule("streaming", root=str(out), img_size=16, batch_size=4))
    assert trainer.global_step == 6


def _image_hashes(dm, epoch_count=2):
    dm.setup("fit")
    loader = dm.train_dataloader()
    out = []
    for _ in range(epoch_count):
        out.append(sorted(hashlib.sha1(x.numpy().tobytes()).hexdigest() + str(int(y))
                          for xs, ys in loader for x, y in zip(xs, ys)))
    return out


def test_augmentation_does_not_depend_on_num_workers(shards):
    _, out, _ = shards
    kwargs = dict(root=str(out), img_size=16, batch_size=4, augment="strong", seed=3)
    serial = _image_hashes(ImageDataModule("streaming", num_workers=0, **kwargs))
    parallel = _image_hashes(ImageDataModule("streaming", num_workers=2, **kwargs))
    assert serial == parallel and serial[0] != serial[1]  # same images, seeded anew each epoch


def test_cli_fit_from_shards(shards, tmp_path, monkeypatch):
    from vit.tasks.classification import ImageClassifier
    from vit.training.cli import DEFAULT_CONFIG
    from vit.training.cli import main as cli_main
    _, out, _ = shards
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        app = cli_main(["fit", "--config", str(DEFAULT_CONFIG.parent / "imagefolder.yaml"), "--data.dataset",
                        "streaming", "--data.root", str(out), *QUICK, "--trainer.max_epochs", "6",
                        "--trainer.limit_train_batches", "null", "--trainer.log_every_n_steps", "1",
                        "--data.augment", "none", "--model.warmup_epochs", "0"])
    ckpt = next((tmp_path / "runs").rglob("*.ckpt"))
    restored = ImageClassifier.load_from_checkpoint(ckpt, weights_only=True)
    assert restored.class_names == CLASSES and restored.model.num_classes == 3
    assert_loss_fell(logged_losses(app))  # it learned from the shards (a bright square per class)


def test_val_carved_from_the_end_of_train_without_val_split(tmp_path):
    src = _source(tmp_path / "src", splits=("train",))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert(src, tmp_path / "out", chunk_bytes="4KB", workers=1)
    dm = ImageDataModule("streaming", root=str(tmp_path / "out"), img_size=16, batch_size=4, val_fraction=1 / 3)
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set)) == (12, 6) and dm.test_set is dm.val_set
    assert sum(len(y) for _, y in dm.train_dataloader()) == 12 and sum(len(y) for _, y in dm.val_dataloader()) == 6


def test_rerun_after_interruption_keeps_finished_splits_without_duplicates(tmp_path, monkeypatch, capsys):
    src = _source(tmp_path / "src", splits=("train", "val"))
    out = tmp_path / "out"
    real = litdata.optimize

    def dies_after_writing(fn, inputs, output_dir, **kwargs):
        real(fn, inputs, output_dir=output_dir, **kwargs)
        if output_dir.endswith(".val.partial"):
            raise KeyboardInterrupt  # killed after writing val's chunks, before the split was put in place
    monkeypatch.setattr(litdata, "optimize", dies_after_writing)
    with warnings.catch_warnings(), pytest.raises(KeyboardInterrupt):
        warnings.simplefilter("ignore")
        convert(src, out, chunk_bytes="4KB", workers=1)
    assert (out / "train" / "index.json").is_file() and not (out / "val").exists()
    with pytest.raises(ShardError, match="vit_dataset.json not found.*finished"):
        ImageDataModule("streaming", root=str(out))
    train_files = {p.name: p.stat().st_mtime_ns for p in (out / "train").iterdir()}
    monkeypatch.setattr(litdata, "optimize", real)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        meta = convert(src, out, chunk_bytes="4KB", workers=1)
    assert "train: 18 images already converted" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in (out / "train").iterdir()} == train_files  # not rewritten
    assert not list(out.glob(".*.partial"))
    for split, count in (("train", 18), ("val", 6)):
        paths = [s["path"] for s in _raw(out / split)]
        assert len(paths) == len(set(paths)) == count == meta["splits"][split]["count"]


def _copy(out, tmp_path):
    shutil.copytree(out, tmp_path / "copy")
    return tmp_path / "copy"


def test_missing_or_cut_chunk_is_named(shards, tmp_path):
    _, out, _ = shards
    copy = _copy(out, tmp_path)
    chunk = sorted((copy / "train").glob("chunk-*.bin"))[1]
    chunk.write_bytes(chunk.read_bytes()[:-10])
    with pytest.raises(ShardError, match=f"chunk {chunk} is damaged"):
        ImageDataModule("streaming", root=str(copy), img_size=16).setup("fit")
    chunk.unlink()
    with pytest.raises(ShardError, match=f"chunk {chunk} is missing"):
        ImageDataModule("streaming", root=str(copy), img_size=16).setup("fit")


def test_corrupt_chunk_is_named_when_read(shards, tmp_path):
    _, out, _ = shards
    copy = _copy(out, tmp_path)
    chunk = sorted((copy / "train").glob("chunk-*.bin"))[0]
    data = bytearray(chunk.read_bytes())
    data[:16] = b"\xff" * 16  # the header (item count, offsets) garbled; the size unchanged
    chunk.write_bytes(bytes(data))
    dm = ImageDataModule("streaming", root=str(copy), img_size=16, batch_size=4)
    dm.setup("fit")
    with pytest.raises(ShardError, match=chunk.name):
        for _ in dm.train_dataloader():
            pass


def test_undecodable_sample_is_skipped_or_named(tmp_path, monkeypatch):
    src = _source(tmp_path / "src", splits=("train", "val"))
    (src / "train" / "bee" / "empty.png").unlink()
    (src / "train" / "cow" / "broken.png").write_bytes(b"\x89PNG but not really")
    real = convert_module.scan_image_folder
    # stored without the header check, as a file that passes it and still fails to decode would be
    monkeypatch.setattr(convert_module, "scan_image_folder", lambda folder, classes, *args: real(folder, classes))
    convert(src, tmp_path / "out", chunk_bytes="4KB", workers=1)
    dm = ImageDataModule("streaming", root=str(tmp_path / "out"), img_size=16, batch_size=4)
    dm.setup("fit")
    with pytest.warns(UserWarning, match="train/cow/broken.png"):
        assert sum(len(y) for _, y in dm.train_dataloader()) == 18  # 19 stored, one left out
    strict = ImageDataModule("streaming", root=str(tmp_path / "out"), img_size=16, on_bad_image="error")
    strict.setup("fit")
    with pytest.raises(BadImageError, match="train/cow/broken.png.*on_bad_image"):
        for _ in strict.train_dataloader():
            pass


@pytest.mark.parametrize("kwargs,match", [
    (dict(dataset="streaming"), "data.root: required for dataset 'streaming'"),
    (dict(dataset="streaming", root="/nonexistent/shards"), "not a directory"),
    (dict(dataset="streaming", root="http://example.com/shards"), "s3:// or gs://"),
    (dict(dataset="streaming", root=".", split_names={"val": "dev"}), "data.split_names: only read by"),
])
def test_bad_streaming_configuration_names_the_key(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ImageDataModule(**kwargs)


def test_folder_that_was_not_converted_is_explained(tmp_path):
    with pytest.raises(ShardError, match="vit_dataset.json not found.*vit shards"):
        ImageDataModule("streaming", root=str(tmp_path))


DDP_SCRIPT = """
import json, os, sys, warnings
import lightning as L
from vit.data import ImageDataModule
from vit.tasks.backbone import Backbone
from vit.tasks.classification import ImageClassifier
from vit.tasks.backbone import Backbone

class Record(L.Callback):
    def __init__(self):
        self.labels = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.labels.append(batch[1].tolist())

    def on_fit_end(self, trainer, module):
        with open(os.path.join(sys.argv[1], f"rank{trainer.global_rank}.json"), "w") as f:
            json.dump({"step": trainer.global_step, "labels": self.labels,
                       "val_acc": float(trainer.callback_metrics.get("val/acc", -1))}, f)

if __name__ == "__main__":
    warnings.simplefilter("ignore")
    kind, root = sys.argv[2], sys.argv[3]
    dm = ImageDataModule(kind, root=root, img_size=16, batch_size=3, streaming=kind == "hf")
    module = ImageClassifier(Backbone(img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2),
                             num_classes=dm.num_classes)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[Record()])
    trainer.fit(module, datamodule=dm)
"""


def run_ddp(tmp_path, kind, root):
    """Two CPU processes (gloo) training two epochs on a streamed source; each rank's record."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    script = tmp_path / "ddp_stream.py"
    script.write_text(DDP_SCRIPT)
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path), kind, str(root)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.slow
def test_ddp_two_processes_share_the_shards_in_equal_steps(shards, tmp_path):
    _, out, _ = shards
    ranks = run_ddp(tmp_path, "streaming", out)
    # litdata shares out whole batches: with 3 a batch, 18 samples are 9 per process, 3 batches each per epoch
    assert ranks[0]["step"] == ranks[1]["step"] == 2 * 3
    for epoch in range(2):
        seen = [label for r in ranks for batch in r["labels"][epoch * 3:(epoch + 1) * 3] for label in batch]
        assert sorted(seen) == [0] * 6 + [1] * 6 + [2] * 6  # each sample once per epoch, on one of the processes
    assert ranks[0]["val_acc"] == ranks[1]["val_acc"] != -1  # validation ran on both, synced


# ---- mid-epoch resume ---------------------------------------------------------------------------------------------
def _ids(batches):
    return [hashlib.sha1(x.numpy().tobytes()).hexdigest() for xs, _ in batches for x in xs]


def _train_loader(out, num_workers=0):
    dm = ImageDataModule("streaming", root=str(out), img_size=16, batch_size=3, num_workers=num_workers)
    dm.setup("fit")
    return dm.train_dataloader()


def test_loader_resumes_once_then_starts_the_next_epoch_afresh(shards):
    """The training loader without Lightning: restored from a position 2 of 6 batches into epoch 1, it yields the
    other 4; a second ``load_state_dict`` (Lightning's own copy, when it builds the loader after restoring the
    checkpoint) changes nothing; and after the 4 batches (Lightning stops at the loader's length, without asking
    for more) the next epoch is the uninterrupted loader's."""
    import itertools
    _, out, _ = shards
    uninterrupted = _train_loader(out)
    epochs = [_ids(uninterrupted) for _ in range(3)]
    stopped = _train_loader(out)
    _ids(stopped)
    trained = _ids(itertools.islice(iter(stopped), 2))
    state = stopped.state_dict()
    resumed = _train_loader(out)
    resumed.load_state_dict(state)
    resumed.load_state_dict({"current_epoch": 0})  # ignored
    assert trained + _ids(itertools.islice(iter(resumed), 4)) == epochs[1]
    assert _ids(resumed) == epochs[2]

RECORD = """
import hashlib, json
import torch
from lightning.pytorch.callbacks import Callback


def sample_ids(batch):
    # a sample's identity in an epoch: its augmentation is seeded by (seed, epoch, sample index), so the same sample
    # in the same epoch gives the same bytes whichever worker, process or run loads it
    images, labels = batch
    return [hashlib.sha1(x.cpu().numpy().tobytes()).hexdigest()[:16] + f":{int(y)}" for x, y in zip(images, labels)]


class Record(Callback):
    \"\"\"Appends each trained batch (step, epoch, sample ids) to batches.jsonl at once, so that the record survives
    a SIGKILL; writes the final weights to final.pt.\"\"\"

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        with open("batches.jsonl", "a") as f:
            f.write(json.dumps({"step": trainer.global_step, "epoch": trainer.current_epoch,
                                "samples": sample_ids(batch)}) + "\\n")

    def on_fit_end(self, trainer, module):
        torch.save({"step": trainer.global_step, "weights": module.state_dict()}, "final.pt")
"""


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _stream_cli(cwd, root, *args):
    """``train.py fit`` on the shards: 3 epochs of 6 batches of 3, last.ckpt every 4 steps (mid-epoch at 4, 8, 16),
    dropout on (the RNG states must be restored too), deterministic CPU; each trained batch recorded."""
    import os
    import subprocess
    import sys

    from conftest import REPO
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), str(cwd)])}
    cmd = [sys.executable, str(REPO / "train.py"), "fit", "--config", str(REPO / "configs" / "imagefolder.yaml"),
           "--data.dataset", "streaming", "--data.root", str(root), "--trainer.max_epochs", "3",
           "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false", "--trainer.deterministic",
           "true", "--trainer.accelerator", "cpu", "--model.backbone.arch", "null", "--model.backbone.embed_dim", "32", "--model.backbone.depth",
           "1", "--model.backbone.num_heads", "2", "--model.backbone.patch_size", "8", "--model.backbone.drop_rate", "0.1", "--data.img_size",
           "16", "--data.batch_size", "3", "--trainer.callbacks+=ModelCheckpoint",
           "--trainer.callbacks.every_n_train_steps=4", "--trainer.callbacks.save_last=true",
           "--trainer.callbacks.save_top_k=0", "--trainer.callbacks+=record.Record", *args]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_trains_the_rest_of_the_stream(shards, tmp_path):
    """A run SIGKILLed in the middle of an epoch and resumed with ``--ckpt_path last`` trains on exactly the samples
    the killed run had not yet trained on since its last checkpoint, in the same order, and ends with the weights of
    an uninterrupted run (2 loader workers: litdata reads ahead in them, but counts only the batches handed out)."""
    import signal

    from conftest import KILL_AT
    _, out, _ = shards
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        (tmp_path / run / "record.py").write_text(RECORD)
    (tmp_path / "b" / "kill_at.py").write_text(KILL_AT)
    full = _stream_cli(tmp_path / "a", out, "--data.num_workers", "2")
    # killed after step 9, in the middle of epoch 1 (steps 7-12); the last save point was step 8
    victim = _stream_cli(tmp_path / "b", out, "--data.num_workers", "2", "--trainer.callbacks+=kill_at.KillAt",
                         "--trainer.callbacks.step=9")
    out_victim = victim.communicate(timeout=300)[0]
    assert victim.returncode == -signal.SIGKILL, out_victim[-3000:]
    (survivor,) = list((tmp_path / "b" / "runs").rglob("last.ckpt"))
    saved = torch.load(survivor, weights_only=True)
    assert saved["global_step"] == 8 and saved["ImageDataModule"]["batches_done"] == 2
    killed = _records(tmp_path / "b" / "batches.jsonl")
    (tmp_path / "b" / "batches.jsonl").unlink()

    resumed = _stream_cli(tmp_path / "b", out, "--data.num_workers", "2", "--ckpt_path", "last")
    out_resumed, out_full = resumed.communicate(timeout=300)[0], full.communicate(timeout=300)[0]
    assert resumed.returncode == 0 and full.returncode == 0, out_resumed[-3000:] + out_full[-3000:]
    assert "epoch 1, global step 8" in out_resumed, out_resumed[-3000:]
    reference, after = _records(tmp_path / "a" / "batches.jsonl"), _records(tmp_path / "b" / "batches.jsonl")
    assert [r["step"] for r in reference] == list(range(1, 19))
    assert killed == reference[:9]  # the same stream until the kill (step 9 trained, then lost)
    assert after == reference[8:]  # from step 9 on: what had not been trained on at the checkpoint, nothing else
    ref, got = (torch.load(tmp_path / run / "final.pt", weights_only=True) for run in ("a", "b"))
    assert got["step"] == ref["step"] == 18
    for name, weight in ref["weights"].items():
        torch.testing.assert_close(got["weights"][name], weight, rtol=0, atol=1e-6, msg=name)


def _fit_recorded(root, run_dir, num_workers, ckpt_path=None, stop_at=None):
    """3 epochs of 6 batches of 3 in this process, a last.ckpt every 4 steps, each trained batch recorded in
    run_dir/batches.jsonl; ``stop_at``: stops with an exception once that many steps are done."""
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint
    from record import Record

    from vit.tasks.backbone import Backbone

    from vit.tasks.classification import ImageClassifier

    class Stop(Callback):
        def on_train_batch_start(self, trainer, *args):
            if trainer.global_step == stop_at:
                raise InterruptedError(f"stopped after step {stop_at}")

    L.seed_everything(0, verbose=False)
    dm = ImageDataModule("streaming", root=str(root), img_size=16, batch_size=3, num_workers=num_workers)
    module = ImageClassifier(Backbone(img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2), num_classes=3)
    checkpoint = ModelCheckpoint(dirpath=run_dir, every_n_train_steps=4, save_last=True, save_top_k=0)
    trainer = L.Trainer(max_epochs=3, limit_val_batches=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=run_dir,
                        callbacks=[checkpoint, Record(), *([Stop()] if stop_at else [])])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path, weights_only=True)


@pytest.mark.parametrize("workers,resume_workers", [(0, 2), (2, 1)])
def test_resume_with_other_num_workers_trains_each_remaining_sample_once(shards, tmp_path, monkeypatch, workers,
                                                                         resume_workers):
    """Stopped mid-epoch (after step 9, checkpoint at step 8: 2 of epoch 1's 6 batches) and resumed with another
    ``data.num_workers``: litdata re-plans the rest of the epoch for the new workers ("elastic" resume), so every
    sample of epoch 1 not trained before the checkpoint comes exactly once, and epoch 2 is whole. The order may
    legitimately differ from the uninterrupted run's (litdata's order depends on the worker count), so the weights
    are not compared; the samples are, by a hash of the augmented image (seeded per sample and epoch)."""
    _, out, _ = shards
    (tmp_path / "record.py").write_text(RECORD)
    monkeypatch.syspath_prepend(str(tmp_path))
    runs = {name: tmp_path / name for name in ("full", "stopped")}
    for run in runs.values():
        run.mkdir()
    monkeypatch.chdir(runs["full"])
    _fit_recorded(out, runs["full"], workers)
    monkeypatch.chdir(runs["stopped"])
    with pytest.raises(InterruptedError):
        _fit_recorded(out, runs["stopped"], workers, stop_at=9)
    before = _records(runs["stopped"] / "batches.jsonl")
    (runs["stopped"] / "batches.jsonl").unlink()
    _fit_recorded(out, runs["stopped"], resume_workers, ckpt_path=runs["stopped"] / "last.ckpt")
    reference, after = _records(runs["full"] / "batches.jsonl"), _records(runs["stopped"] / "batches.jsonl")

    def samples(records, epoch):
        return sorted(s for r in records if r["epoch"] == epoch for s in r["samples"])
    assert before == reference[:9]
    assert [r["step"] for r in after] == list(range(9, 19))
    rest = samples(after, 1)
    assert len(rest) == len(set(rest)) == 12  # the 4 batches of epoch 1 still to train, no sample twice
    assert rest == samples(reference[8:12], 1)  # exactly those the uninterrupted run trained after step 8
    assert not set(rest) & set(samples(before[6:8], 1))  # none of those trained before the checkpoint
    assert samples(after, 2) == samples(reference, 2) and len(set(samples(after, 2))) == 18  # the next epoch whole
