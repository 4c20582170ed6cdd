import csv
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from vit.training.cli import DEFAULT_CONFIG, cli, main

QUICK = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "2",
         "--trainer.limit_test_batches", "2", "--trainer.enable_progress_bar", "false", "--model.backbone.embed_dim", "32",
         "--model.backbone.depth", "1", "--model.backbone.num_heads", "2", "--data.img_size", "16"]


def test_overrides_reach_model_and_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    app = cli(["--config", str(DEFAULT_CONFIG), "--trainer.max_epochs", "5", "--model.backbone.embed_dim", "48",
               "--model.backbone.num_heads", "3", "--data.img_size", "24", "--data.batch_size", "16"], run=False)
    assert app.trainer.max_epochs == 5
    assert app.model.model.embed_dim == 48 and app.model.model.img_size == (24, 24)
    assert app.datamodule.batch_size == 16
    assert app.model.model.num_classes == app.datamodule.num_classes == 10  # linked, never stated twice
    assert app.model.class_names == [str(i) for i in range(10)]


def test_default_run_fits_tests_and_prints_final_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    app = main(QUICK)
    out = capsys.readouterr().out
    assert "digits test accuracy:" in out and "wall time:" in out
    run_dir = Path(app.trainer.log_dir).resolve()
    assert (tmp_path / "runs").is_dir() and run_dir.is_relative_to(tmp_path / "runs")
    assert list(run_dir.rglob("last.ckpt")) and list(run_dir.rglob("metrics.csv"))
    assert list((tmp_path / "runs").rglob("events.out.tfevents*"))


def test_a_recipe_given_to_the_default_run_stands_on_its_own(tmp_path, monkeypatch, capsys):
    """`python train.py --config R` fits what `python train.py fit --config R` fits: nothing of the digits recipe
    (no flips, EMA, warm-up 5, patch 2) under it."""
    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model:\n  backbone:\n    patch_size: 4\ndata:\n  dataset: digits\n  batch_size: 16\n")
    app = main(["--config", str(recipe), *QUICK])
    assert "digits test accuracy:" in capsys.readouterr().out
    assert app.datamodule.hflip is True and app.model.hparams.ema_decay is None  # the classes' defaults
    assert app.model.hparams.warmup_epochs != 5 and app.model.model.patch_size == 4
    assert app.datamodule.batch_size == 16
    fitted = cli(["--config", str(recipe), *QUICK], run=False)  # what `fit --config` parses
    assert fitted.model.hparams == app.model.hparams
    assert fitted.datamodule.hparams == app.datamodule.hparams


def test_image_folder_trains_end_to_end(tmp_path, monkeypatch, image_folder):
    monkeypatch.chdir(tmp_path)
    app = main(["fit", "--config", str(DEFAULT_CONFIG.parent / "imagefolder.yaml"), "--data.root",
                str(image_folder), "--data.batch_size", "8", *QUICK, "--trainer.max_epochs", "8",
                "--trainer.log_every_n_steps", "1", "--data.augment", "none", "--model.warmup_epochs", "0"])
    ckpts = list((tmp_path / "runs").rglob("*.ckpt"))
    assert ckpts
    # it learned: the classes are a bright square in a class-specific corner, easy for 8 epochs of 2 batches
    rows = list(csv.DictReader(open(next(Path(app.trainer.log_dir).rglob("metrics.csv")))))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) >= 8 and sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses
    assert float(app.trainer.callback_metrics["val/acc"]) >= 0.75
    from vit.tasks.classification import ImageClassifier
    restored = ImageClassifier.load_from_checkpoint(ckpts[0], weights_only=True)
    assert restored.class_names == ["cat", "dog"]


def test_bad_config_value_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as err:
        main(["fit", "--config", str(DEFAULT_CONFIG), "--data.dataset", "mnist"])
    assert err.value.code == 2
    message = capsys.readouterr().err
    assert "data.dataset" in message and "mnist" in message and "Traceback" not in message


@pytest.mark.parametrize("where", ["command line", "config file"])
def test_flat_architecture_keys_of_old_recipes_name_their_new_place(where, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    if where == "command line":
        args = ["fit", "--config", str(DEFAULT_CONFIG), "--model.embed_dim", "64", "--model.pretrained=x.pth"]
    else:
        recipe = tmp_path / "old.yaml"
        recipe.write_text("model:\n  arch: vit_tiny_patch16_224\n  depth: 2\n  lr: 0.001\n")
        args = ["fit", "--config", str(DEFAULT_CONFIG), "--config", str(recipe)]
    with pytest.raises(SystemExit) as err:
        main(args)
    assert err.value.code == 2
    message = capsys.readouterr().err
    assert "Traceback" not in message and len(message.strip().splitlines()) == 1
    if where == "command line":
        assert "model.embed_dim moved to model.backbone.embed_dim (on the command line)" in message
        assert "model.pretrained moved to model.backbone.pretrained" in message
    else:
        assert "model.arch moved to model.backbone.arch (in " in message and "old.yaml" in message
        assert "model.depth moved to model.backbone.depth" in message and "model.lr" not in message


def test_backbone_keys_reach_the_model_from_the_command_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from vit.training.cli import cli
    app = cli(["--config", str(DEFAULT_CONFIG), "--model.backbone.arch", "vit_tiny_patch16_224",
               "--model.backbone.patch_size", "8", "--model.backbone.depth", "1", "--model.backbone.freeze",
               "backbone", "--data.img_size", "32"], run=False)
    model = app.model.model
    # digits.yaml sets embed_dim 64 over the arch's 192: explicit overrides win, the command line over both
    assert model.embed_dim == 64 and len(model.blocks) == 1 and model.img_size == (32, 32)
    assert model.num_classes == 10  # linked from the data
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"head.weight", "head.bias"}


def test_default_root_dir_holds_the_whole_run_and_its_resume(tmp_path, monkeypatch, capsys):
    cwd, root = tmp_path / "cwd", tmp_path / "root"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    app = main(["fit", "--config", str(DEFAULT_CONFIG), *QUICK, "--trainer.default_root_dir", str(root)])
    run_dir = root / "vit" / "version_0"
    assert Path(app.trainer.log_dir).resolve() == run_dir
    for name in ("config.yaml", "hparams.yaml", "metrics.csv", "checkpoints/last.ckpt"):
        assert (run_dir / name).is_file(), name
    assert list(run_dir.glob("events.out.tfevents*"))  # TensorBoard and CSV share one version_N
    assert list(cwd.iterdir()) == []  # nothing in the current directory, no runs/

    # --ckpt_path last finds last.ckpt under the root this command was given, and the resume is version_1
    last = run_dir / "checkpoints" / "last.ckpt"
    app = main(["fit", "--config", str(DEFAULT_CONFIG), *QUICK, "--trainer.max_epochs", "2",
                "--trainer.default_root_dir", str(root), "--ckpt_path", "last"])
    assert Path(app.trainer.ckpt_path).resolve() == last and app.trainer.current_epoch == 2
    assert (root / "vit" / "version_1" / "checkpoints" / "last.ckpt").is_file()
    assert list(cwd.iterdir()) == []

    capsys.readouterr()
    with pytest.raises(SystemExit):  # a root without checkpoints is named in the error
        main(["fit", "--config", str(DEFAULT_CONFIG), *QUICK, "--trainer.default_root_dir", str(tmp_path / "empty"),
              "--ckpt_path", "last"])
    assert str(tmp_path / "empty") in capsys.readouterr().err


def test_precision_auto_is_bf16_only_where_the_hardware_runs_it_natively(monkeypatch):
    import torch

    from vit.training.cli import resolve_precision

    def hardware(cuda=False, cuda_bf16=False, avx512_bf16=False, amx=False):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: cuda_bf16)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: avx512_bf16 or amx)

    hardware(cuda=True, cuda_bf16=True)
    assert resolve_precision("auto") == resolve_precision("gpu") == resolve_precision("cuda") == "bf16-mixed"
    assert resolve_precision("cpu") == "32-true"  # the GPU's bf16 says nothing about the CPU
    hardware(cuda=True, cuda_bf16=False)  # e.g. V100, T4: bf16 only emulated
    assert resolve_precision("auto") == resolve_precision("gpu") == "32-true"
    hardware()  # AVX2-only CPU: bf16 matmuls are emulated, many times slower than fp32
    assert resolve_precision("auto") == resolve_precision("cpu") == "32-true"
    hardware(avx512_bf16=True)
    assert resolve_precision("auto") == resolve_precision("cpu") == "bf16-mixed"
    hardware(amx=True)
    assert resolve_precision("cpu") == "bf16-mixed"


@pytest.mark.parametrize("recipe", ["cifar10.yaml", "finetune/full.yaml", "finetune/high_res.yaml",
                                    "finetune/linear_probe.yaml"])
def test_recipes_use_precision_auto_and_run_fp32_on_a_cpu_without_native_bf16(recipe, tmp_path, monkeypatch,
                                                                             image_folder, capsys):
    import torch
    import yaml

    path = DEFAULT_CONFIG.parent / recipe
    assert yaml.safe_load(path.read_text())["trainer"]["precision"] == "auto"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    app = cli(["--config", str(path), "--data.dataset", "imagefolder", "--data.root", str(image_folder),
               "--data.img_size", "32", "--model.backbone.arch", "null", "--model.backbone.patch_size", "8", "--model.backbone.embed_dim", "32",
               "--model.backbone.depth", "1", "--model.backbone.num_heads", "2", "--model.backbone.freeze", "none"], run=False)
    assert app.trainer.precision == "32-true"
    assert capsys.readouterr().out.count("precision auto -> 32-true") == 1  # said once, at the start
    assert app.config["trainer"]["precision"] == "auto"  # config.yaml keeps "auto": a rerun resolves again


@pytest.mark.slow  # the default recipe for six epochs, in a fresh interpreter: about 20 s
def test_default_run_on_a_fresh_clone_prints_no_warnings(tmp_path):
    """`python train.py` in an empty directory: stderr has no Python warning (jsonargparse's, Lightning's, torch's).
    Lightning prints its own warnings as `file.py:LINE: message`, without the category, so both forms are checked."""
    import re
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    env["OMP_NUM_THREADS"] = os.environ.get("VIT_TEST_THREADS", "2")
    train = Path(__file__).resolve().parents[2] / "train.py"
    # 6 of the recipe's 40 epochs (246 steps, so its EMA's ~100-step average has left the initial weights), its 5
    # warm-up epochs cut to 1 so the learning rate gets to its peak
    proc = subprocess.run([sys.executable, str(train), "--trainer.max_epochs", "6", "--model.warmup_epochs", "1"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    accuracy = float(re.search(r"digits test accuracy: ([0-9.]+)", proc.stdout).group(1))
    # the default run must learn: 6 of its 40 epochs gave 0.26 here, well above chance (0.10); its finer tokens
    # start slower than the old patch-4 recipe and end higher (0.97)
    assert accuracy >= 0.2, proc.stdout[-2000:]
    # a clean screen: no cloud-logger advertisement, and a model summary whose FLOPs are counted, not zeros
    assert "litlogger" not in proc.stdout.lower() + proc.stderr.lower()
    flops = re.search(r"Total FLOPs: ([0-9.]+)", proc.stdout)
    assert flops and float(flops.group(1)) > 0, proc.stdout[:3000]
    noisy = [line for line in proc.stderr.splitlines()
             if "warn" in line.lower() or re.search(r"\.py:\d+: ", line)]
    assert noisy == [], "\n".join(noisy)


DDP_SCRIPT = textwrap.dedent("""
    import hashlib, json, os, sys
    import lightning as L
    import torch
    from torch.utils.data import Dataset
    from vit.data import ImageDataModule
    from vit.data.sampling import split_index
    from vit.tasks.backbone import Backbone
    from vit.tasks.classification import ImageClassifier

    class Seen(Dataset):
        # the training split, noting which of its samples this process loads (num_workers=0: in this process)
        def __init__(self, inner):
            self.inner, self.loaded = inner, []

        def __len__(self):
            return len(self.inner)

        def __getitem__(self, item):
            self.loaded.append(split_index(item)[0])
            return self.inner[item]

    class Data(ImageDataModule):
        def setup(self, stage=None):
            super().setup(stage)
            if not isinstance(self.train_set, Seen):
                self.train_set = Seen(self.train_set)

    class Record(L.Callback):
        # per rank: the sample indices and a hash of the images of each training batch, and the final weights
        def __init__(self):
            self.batches = []

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            data = trainer.datamodule.train_set
            images, labels = batch
            self.batches.append({"indices": list(data.loaded), "labels": labels.tolist(),
                                 "labels_of_indices": [int(data.inner.labels[data.inner.indices[i]])
                                                       for i in data.loaded],
                                 "sha1": hashlib.sha1(images.numpy().tobytes()).hexdigest()})
            data.loaded.clear()

        def on_fit_end(self, trainer, module):
            rank = trainer.global_rank
            torch.save(torch.cat([p.detach().flatten() for p in module.parameters()]),
                       os.path.join(sys.argv[1], f"weights{rank}.pt"))
            out = {"rank": rank, "world": trainer.world_size, "step": trainer.global_step,
                   "val_acc": float(trainer.callback_metrics["val/acc"]), "batches": self.batches,
                   "n_train": len(trainer.datamodule.train_set),
                   "sampler": type(trainer.train_dataloader.sampler).__name__}
            with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
                json.dump(out, f)

    if __name__ == "__main__":
        L.seed_everything(0)
        torch.save(torch.cat([p.detach().flatten() for p in ImageClassifier(
            Backbone(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2), num_classes=10).parameters()]),
            os.path.join(sys.argv[1], "weights_init.pt"))
        L.seed_everything(0)
        # a whole epoch (1,258 training digits, 629 per rank = 10 batches of 64), so coverage can be checked
        dm = Data("digits", img_size=16, batch_size=64)
        module = ImageClassifier(Backbone(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2), num_classes=10)
        trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, limit_val_batches=3,
                            logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, callbacks=[Record()])
        trainer.fit(module, datamodule=dm)
""")


@pytest.mark.slow
def test_ddp_two_cpu_processes_train_in_sync(tmp_path):
    import json

    import torch

    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world"] == 2 for r in ranks)
    assert all(r["sampler"] == "EpochSampler" for r in ranks)  # splits by rank itself; Lightning leaves it unwrapped
    n = ranks[0]["n_train"]
    assert n == ranks[1]["n_train"] == 1258
    assert ranks[0]["step"] == ranks[1]["step"] == 10  # both ranks took every optimizer step

    # the ranks load different samples: disjoint halves that together are the whole epoch, each sample once
    seen = [[i for b in r["batches"] for i in b["indices"]] for r in ranks]
    assert all(b["labels_of_indices"] == b["labels"] for r in ranks for b in r["batches"])  # indices are the batch's
    assert len(seen[0]) == len(seen[1]) == n // 2 and len(set(seen[0])) == len(set(seen[1])) == n // 2
    assert not set(seen[0]) & set(seen[1])
    assert set(seen[0]) | set(seen[1]) == set(range(n))
    hashes = [{b["sha1"] for b in r["batches"]} for r in ranks]
    assert len(hashes[0]) == len(hashes[1]) == 10 and not hashes[0] & hashes[1]  # no batch is the same

    # ...yet their weights are identical and have moved: every step applied the gradient averaged over both ranks
    weights = [torch.load(tmp_path / f"weights{r}.pt", weights_only=True) for r in (0, 1)]
    assert torch.equal(weights[0], weights[1])
    assert not torch.allclose(weights[0], torch.load(tmp_path / "weights_init.pt", weights_only=True))
    assert ranks[0]["val_acc"] == ranks[1]["val_acc"]  # metric synced across ranks


def test_value_ranges_are_checked_while_parsing_shown_in_help_and_stored_as_plain_numbers(tmp_path, monkeypatch,
                                                                                        capsys):
    from vit.training.cli import DEFAULT_CONFIG, cli
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        cli(["fit", "--help"])
    assert "PositiveFloat" in capsys.readouterr().out  # --model.lr's range, in --help
    app = cli(["--config", str(DEFAULT_CONFIG), "--model.lr", "0.002", "--data.batch_size", "16"], run=False)
    # the CLI hands over jsonargparse's range types; checkpoints (weights_only) and hparams.yaml need plain ones
    assert type(app.model.hparams.lr) is float and type(app.datamodule.hparams.batch_size) is int
    with pytest.raises(SystemExit):
        cli(["--config", str(DEFAULT_CONFIG), "--model.label_smoothing", "1.0"], run=False)
    assert "model.label_smoothing" in capsys.readouterr().err


def test_small_data_recipe_trains_to_its_time_budget_and_tests_the_final_weights(tmp_path, monkeypatch, capsys):
    from conftest import write_image_folder

    from vit.training.cli import DEFAULT_CONFIG, main
    images = write_image_folder(tmp_path / "images", classes=("cat", "dog", "fox"), per_class=6, size=32)
    monkeypatch.chdir(tmp_path)
    app = main(["--config", str(DEFAULT_CONFIG.parent / "small_data.yaml"), "--data.root", str(images),
                "--trainer.max_time", "00:00:00:08", "--model.backbone.embed_dim", "32", "--model.backbone.depth", "1",
                "--model.backbone.num_heads", "2", "--data.batch_size", "8", "--data.num_workers", "0",
                "--trainer.enable_progress_bar", "false"])
    model = app.model.model
    assert (model.config.embed_layer, model.config.attn_layer) == ("conv_stem", "lsa")
    assert app.model.hparams.schedule == "budget"
    assert model.global_pool == "avg" and app.datamodule.hflip and app.model.hparams.ema_decay == 0.99
    timer = next(c for c in app.trainer.callbacks if type(c).__name__ == "Timer")
    assert timer.time_elapsed("train") >= 7.5 and app.trainer.current_epoch >= 2  # stopped by the clock
    lr = app.trainer.optimizers[0].param_groups[0]["lr"]
    assert lr < 0.2 * app.model.hparams.lr  # the schedule ran its course in the time given
    assert "imagefolder test accuracy:" in capsys.readouterr().out


@pytest.mark.slow  # two processes start torch and Lightning: about half a minute on 2 CPU cores
def test_torchrun_launches_a_two_process_ddp_fit_on_cpu(tmp_path):
    """docs/scale.md's multi-node launch, as far as one CPU machine can run it: torchrun starts 2 processes,
    Lightning picks up torchrun's environment (rank, world size), both train and rank 0 writes the checkpoint."""
    import shutil
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not on PATH")
    train = Path(__file__).resolve().parents[2] / "train.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", str(train), "fit", "--config",
                           str(DEFAULT_CONFIG), "--trainer.accelerator", "cpu", "--trainer.devices", "2",
                           "--trainer.strategy", "ddp", "--trainer.max_epochs", "1", "--trainer.limit_train_batches",
                           "2", "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
                           "--model.backbone.embed_dim", "32", "--model.backbone.depth", "1",
                           "--model.backbone.num_heads", "2"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in proc.stdout + proc.stderr
    assert list(tmp_path.rglob("last.ckpt"))
