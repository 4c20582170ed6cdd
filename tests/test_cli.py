import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from vit.cli import DEFAULT_CONFIG, cli, main

QUICK = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "2",
         "--trainer.limit_test_batches", "2", "--trainer.enable_progress_bar", "false", "--model.embed_dim", "32",
         "--model.depth", "1", "--model.num_heads", "2", "--data.img_size", "16"]


def test_overrides_reach_model_and_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    app = cli(["--config", str(DEFAULT_CONFIG), "--trainer.max_epochs", "5", "--model.embed_dim", "48",
               "--model.num_heads", "3", "--data.img_size", "24", "--data.batch_size", "16"], run=False)
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


def test_image_folder_trains_end_to_end(tmp_path, monkeypatch, image_folder):
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(DEFAULT_CONFIG.parent / "imagefolder.yaml"), "--data.root", str(image_folder),
          "--data.batch_size", "8", *QUICK])
    ckpts = list((tmp_path / "runs").rglob("*.ckpt"))
    assert ckpts
    from vit.module import ImageClassifier
    restored = ImageClassifier.load_from_checkpoint(ckpts[0], weights_only=True)
    assert restored.class_names == ["cat", "dog"]


def test_bad_config_value_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises((SystemExit, ValueError)) as err:
        main(["fit", "--config", str(DEFAULT_CONFIG), "--data.dataset", "mnist"])
    message = str(err.value) + capsys.readouterr().err
    assert "data.dataset" in message


DDP_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import lightning as L
    import torch
    from vit.data import ImageDataModule
    from vit.module import ImageClassifier

    class Record(L.Callback):
        def on_fit_end(self, trainer, module):
            flat = torch.cat([p.detach().flatten() for p in module.parameters()])
            out = {"rank": trainer.global_rank, "world": trainer.world_size, "step": trainer.global_step,
                   "checksum": float(flat.double().sum()), "val_acc": float(trainer.callback_metrics["val/acc"]),
                   "n_train": len(trainer.train_dataloader.sampler) if hasattr(trainer.train_dataloader, "sampler") else -1}
            with open(os.path.join(sys.argv[1], f"rank{trainer.global_rank}.json"), "w") as f:
                json.dump(out, f)

    if __name__ == "__main__":
        L.seed_everything(0)
        dm = ImageDataModule("digits", img_size=16, batch_size=16)
        module = ImageClassifier(num_classes=10, img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2)
        trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, limit_train_batches=4,
                            limit_val_batches=3, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, callbacks=[Record()])
        trainer.fit(module, datamodule=dm)
""")


@pytest.mark.slow
def test_ddp_two_cpu_processes_train_in_sync(tmp_path):
    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world"] == 2 for r in ranks)
    assert ranks[0]["step"] == ranks[1]["step"] == 4  # both ranks took every optimizer step
    assert ranks[0]["checksum"] == pytest.approx(ranks[1]["checksum"], rel=1e-6)  # gradients were all-reduced
    assert ranks[0]["val_acc"] == ranks[1]["val_acc"]  # metric synced across ranks
