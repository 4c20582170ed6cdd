"""Detection through train.py in real processes: a run killed mid-epoch resumes with `--ckpt_path last` to the
uninterrupted run's weights, and a 2-process DDP fit on CPU trains each rank on its own equal share."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import KILL_AT, REPO

# 48 scenes (36 to train: 6 batches of 6), a one-block ViT at 32 px: seconds per epoch on one core
TINY_DETECTION = ["--config", str(REPO / "configs" / "detection" / "shapes.yaml"), "--trainer.accelerator", "cpu",
                  "--trainer.enable_progress_bar", "false", "--trainer.deterministic", "true",
                  "--trainer.log_every_n_steps", "1", "--data.num_images", "48", "--data.img_size", "32",
                  "--data.batch_size", "6", "--data.num_workers", "0", "--model.backbone.embed_dim", "32",
                  "--model.backbone.depth", "1", "--model.backbone.num_heads", "2", "--model.out_channels", "16",
                  "--model.representation_size", "32", "--model.roi_batch_size", "16"]


def _train(cwd, *args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), str(cwd)])}
    cmd = [sys.executable, str(REPO / "train.py"), "fit", *TINY_DETECTION, *args]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _last(cwd) -> dict:
    last = max((Path(cwd) / "runs").rglob("last.ckpt"), key=lambda p: p.stat().st_mtime_ns)
    return torch.load(last, weights_only=True)


@pytest.mark.slow
def test_a_detector_killed_mid_epoch_resumes_to_the_uninterrupted_weights(tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    (tmp_path / "b" / "kill_at.py").write_text(KILL_AT)
    saves = ["--trainer.max_epochs", "4", "--trainer.callbacks+=ModelCheckpoint",
             "--trainer.callbacks.every_n_train_steps=4", "--trainer.callbacks.save_last=true",
             "--trainer.callbacks.save_top_k=0"]
    full = _train(tmp_path / "a", *saves)
    # killed before step 9 (epoch 1 has steps 6-11): the last save point was step 8, two batches into epoch 1
    victim = _train(tmp_path / "b", *saves, "--trainer.callbacks+=kill_at.KillAt", "--trainer.callbacks.step=9")
    out_victim = victim.communicate(timeout=600)[0]
    assert victim.returncode == -signal.SIGKILL, out_victim[-3000:]
    saved = _last(tmp_path / "b")
    assert saved["global_step"] == 8 and saved["DetectionDataModule"] == {"epoch": 1, "batches_done": 2}

    resumed = _train(tmp_path / "b", *saves, "--ckpt_path", "last")
    out_resumed, out_full = resumed.communicate(timeout=600)[0], full.communicate(timeout=600)[0]
    assert resumed.returncode == 0 and full.returncode == 0, out_resumed[-3000:] + out_full[-3000:]
    assert "epoch 1, global step 8" in out_resumed and "data position" in out_resumed, out_resumed[-3000:]
    reference, got = _last(tmp_path / "a"), _last(tmp_path / "b")
    assert got["global_step"] == reference["global_step"] == 24
    for name, value in reference["state_dict"].items():
        torch.testing.assert_close(got["state_dict"][name], value, rtol=0, atol=1e-5, msg=name)


RANK_STEPS = """
import json, sys
from pathlib import Path
from lightning.pytorch.callbacks import Callback


class RankSteps(Callback):
    \"\"\"Each rank writes the image ids it trained on and its final step count.\"\"\"

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        with open(Path.cwd() / f"ids{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps([int(t["image_id"]) for t in batch[1]]) + "\\n")

    def on_fit_end(self, trainer, module):
        flat = __import__("torch").cat([p.detach().flatten() for p in module.parameters()])
        __import__("torch").save({"step": trainer.global_step, "weights": flat,
                                  "map": float(trainer.callback_metrics["val/map_50"])},
                                 Path.cwd() / f"final{trainer.global_rank}.pt")
"""


@pytest.mark.slow
def test_a_two_process_ddp_detection_fit_on_cpu(tmp_path):
    (tmp_path / "rank_steps.py").write_text(RANK_STEPS)
    run = _train(tmp_path, "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.max_epochs", "2",
                 "--trainer.callbacks+=rank_steps.RankSteps")
    out = run.communicate(timeout=600)[0]
    assert run.returncode == 0, out[-4000:]
    import json
    ids = [[json.loads(line) for line in (tmp_path / f"ids{rank}.jsonl").read_text().splitlines()] for rank in (0, 1)]
    assert len(ids[0]) == len(ids[1]) == 6  # 36 training scenes, 2 ranks x 3 batches of 6, 2 epochs
    epoch0 = [{i for batch in rank[:3] for i in batch} for rank in ids]
    assert not epoch0[0] & epoch0[1] and len(epoch0[0] | epoch0[1]) == 36  # disjoint shares covering the epoch
    finals = [torch.load(tmp_path / f"final{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert finals[0]["step"] == finals[1]["step"] == 6
    assert torch.equal(finals[0]["weights"], finals[1]["weights"])  # gradients were all-reduced
    assert finals[0]["map"] == finals[1]["map"] >= 0.0  # the metric is synced: every rank logs the same value
