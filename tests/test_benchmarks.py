"""The benchmark scripts run end to end in a tiny mode (1 repeat, tiny model, few images), so they never rot."""
import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import vit

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def throughput():
    return _load("throughput")


def test_throughput_tiny_mode_prints_every_table(throughput, capsys):
    threads = torch.get_num_threads()
    try:
        peak, rows, ckpt_rows = throughput.main(["--tiny", "--repeats", "1", "--warmup", "0"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "matmul peak" in out and "| tiny | ours | infer |" in out and "| tiny | timm | train |" in out
    assert peak > 0
    assert {(r["impl"], r["mode"]) for r in rows} == {(i, m) for i in ("ours", "timm") for m in ("infer", "train")}
    assert all(r["ips"] > 0 for r in rows)
    assert [r["checkpointing"] for r in ckpt_rows] == [False, True]
    # checkpointing keeps less for backward (exact bytes; the tiny model's peak RSS is within allocator noise)
    assert ckpt_rows[1]["saved"] < ckpt_rows[0]["saved"] / 2


def test_attention_tiny_mode_times_both_forms_and_says_which_vit_runs(capsys):
    threads = torch.get_num_threads()
    try:
        rows = _load("attention").main(["--tiny"])
    finally:
        torch.set_num_threads(threads)
    assert "| explicit / fused |" in capsys.readouterr().out
    assert len(rows) == 4 and all(r["fused"] > 0 and r["explicit"] > 0 for r in rows)
    # the explicit form exactly where training in bf16
    assert [r["picks"] for r in rows] == ["fused", "fused", "fused", "explicit"]


@pytest.mark.parametrize("kwargs", [dict(), dict(distilled=True), dict(class_token=False, global_pool="avg")])
def test_flops_per_image_match_torch_flop_counter(throughput, kwargs):
    model = vit.VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10,
                                  **kwargs).eval()
    counter = FlopCounterMode(display=False)
    # the math backend spells attention as two batched matmuls, which the counter sees (the CPU flash kernel not)
    with counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model(torch.randn(1, 3, 32, 32))
    # torch's counter counts the same matmuls (convolution, linear, attention) and nothing else
    assert throughput.model_flops(model) == counter.get_total_flops()


def test_dataloader_tiny_mode_compares_pipelines_and_model(capsys):
    dataloader = _load("dataloader")
    threads = torch.get_num_threads()
    try:
        rows = dataloader.main(["--images", "8", "--repeats", "1", "--batch", "4", "--sizes", "32,64"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "ours (albumentations)" in out and "torchvision v2" in out and "training step" in out
    pipelines = [r for r in rows if r["split"] in ("train", "eval")]
    assert len(pipelines) == 8 and all(r["ips"] > 0 for r in pipelines)
    sources = [r for r in rows if r["split"] == "source"]
    assert [r["source"] for r in sources] == ["image folder", "image folder + data.cache",
                                              "litdata chunks (streaming)", "parquet (hf)"]
    assert all(r["ips"] > 0 and r["first"] > 0 and r["images"] == 8 for r in sources)
    by_source = {r["source"]: r["ips"] for r in sources}  # decoding once is not slower, beyond a noise margin
    assert by_source["image folder + data.cache"] > 0.5 * by_source["image folder"], by_source
    assert "| parquet (hf) | 8 |" in out


def test_train_loop_tiny_mode_compares_our_cli_and_a_timm_loop(capsys, tmp_path, monkeypatch):
    train_loop = _load("train_loop")
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    try:
        rows = train_loop.main(["--tiny"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "| timm loop |" in out and "| ours + data.cache |" in out
    assert [r["loop"] for r in rows] == ["ours", "ours + data.cache", "timm loop",
                                         "model step alone (no data, the ceiling)"]
    assert all(r["img_s"] > 0 for r in rows)
    ceiling = rows[-1]["img_s"]  # the model step alone bounds every loop (within noise)
    assert all(r["img_s"] < 2 * ceiling for r in rows[:-1]), rows


def test_inference_tiny_mode_prints_speed_and_agreement_tables_and_saves_the_order(capsys, tmp_path):
    pytest.importorskip("onnxruntime")
    from vit.deploy.order import measured_order
    from vit.utils.hardware import native_bf16
    inference = _load("inference")
    threads = torch.get_num_threads()
    order_file = tmp_path / "order.json"
    try:  # digits, never the CIFAR photos of shared/data: tests run where that folder is not
        rows, agreement = inference.main(["--tiny", "--images", "digits", "--repeats", "1", "--warmup", "0",
                                          "--batches", "1,2", "--backends", "eager,onnxruntime", "--threads",
                                          str(threads), "--train-seconds", "1", "--train-images", "64",
                                          "--test-images", "32", "--save-order", "--order-file", str(order_file)])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "| tiny | 2 | timm | eager | fp32 |" in out and "| tiny | 2 | ours | onnxruntime | int8 |" in out
    assert "share of matmul peak" in out and "matmul peak (2048^2, GFLOP/s): fp32 " in out
    assert "top-1 agreement with eager fp32 on 32 real test photos" in out
    assert "target: auto's choice >= 4.0x" in out and "target: best path >= 5.0x" in out
    pairs = [("eager", "fp32"), ("onnxruntime", "fp32"), ("eager", "bf16"), ("eager", "int8"), ("onnxruntime", "int8")]
    assert {(r["impl"], r["backend"], r["precision"]) for r in rows} == {("timm", "eager", "fp32")} | {
        ("ours", *pair) for pair in pairs}
    assert len(rows) == 12 and [(r["backend"], r["precision"]) for r in agreement] == pairs
    native = native_bf16("cpu")[0]
    for r in rows:  # bf16 runs only where native; elsewhere its row says why
        assert (r.get("ips", 0) > 0) if (r["precision"] != "bf16" or native) else "not native" in r["missing"]
    assert all(r["peak_share"] is None or 0 < r["peak_share"] for r in rows if r.get("ips"))
    assert [r["agreement"] for r in agreement[:2]] == [1.0, 1.0]
    saved = measured_order(path=order_file)  # this machine's entry: what create_runner's auto reads
    assert saved and ("onnxruntime", "fp32") in saved and ("eager", "fp32") in saved
    assert f"auto's order for this machine: {' '.join(saved[0])}" in out


@pytest.mark.slow
def test_small_data_tiny_mode_trains_under_a_budget_and_draws_the_curve(capsys, tmp_path):
    small_data = _load("small_data")
    rows = small_data.main(["--tiny", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "| budget (min) | epochs | wall (min) | best val/acc | test accuracy |" in out
    (row,) = rows
    assert row["minutes"] == pytest.approx(1 / 3) and row["epochs"] >= 1
    assert row["test"] > 0.5  # 4 classes (chance 0.25), each a bright quadrant: the budget must learn them
    assert row["test_images"] > 0 and row["wall_min"] < 2
    assert (tmp_path / "results.csv").read_text().startswith("minutes,")
    pytest.importorskip("matplotlib")
    assert (tmp_path / "accuracy_vs_minutes.png").stat().st_size > 1000


@pytest.mark.slow  # three detectors built and stepped: ~40 s on 2 shared cores
def test_detection_tiny_mode_compares_vit_global_windowed_and_resnet50_fpn(capsys):
    detection = _load("detection")
    threads = torch.get_num_threads()
    try:
        rows = detection.main(["--tiny", "--sizes", "64", "--batch", "1", "--repeats", "1", "--warmup", "0"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "| size | model | params (M) | train img/s | train peak MB | infer img/s | infer peak MB |" in out
    assert [r["model"] for r in rows] == ["vit-s16 global", "vit-s16 window", "resnet50-fpn",
                                          "vit-s16 global (ViT only)", "vit-s16 window (ViT only)"]
    assert all(r["train_ips"] > 0 for r in rows) and all(r["infer_ips"] > 0 for r in rows[:3])
    global_, windowed, resnet = rows[:3]
    vit_global, vit_windowed = rows[3:]
    assert vit_windowed["gflops"] < vit_global["gflops"]  # 2x2 windows of a 4x4 grid: a quarter of the attention
    assert vit_global["saved"] > 0 and vit_windowed["saved"] > 0
    assert global_["params"] == windowed["params"]  # windows add no parameters
    # torchvision's fasterrcnn_resnet50_fpn, 91 classes; without backbone weights its BatchNorms train (41,755,286
    # in torchvision's table counts them frozen, as buffers)
    assert resnet["params"] == 41_808_406
    assert "| 64 | resnet50-fpn |" in out and ("peak RSS growth" in out or "max_memory_allocated" in out)


@pytest.mark.slow
@pytest.mark.parametrize("task,data,val,score", [("detection", "shapes_coco", "val/map_50", "test mAP@50"),
                                                 ("segmentation", "shapes_masks", "val/miou", "test mIoU")])
def test_small_data_runs_each_task_recipe_on_its_own_folder_layout(task, data, val, score, capsys, tmp_path):
    small_data = _load("small_data")
    rows = small_data.main(["--task", task, "--tiny", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert f"data: {data}; recipe: configs/{task}/small_data.yaml" in out  # a COCO folder, a mask folder
    assert f"| budget (min) | epochs | wall (min) | best {val} | {score} |" in out
    (row,) = rows
    assert row["test_images"] == 8  # the folder's own test split (8 scenes), not val doubling as test
    assert row["epochs"] >= 1 and 0.0 <= row["best_val"] <= 1.0 and 0.0 <= row["test"] <= 1.0


def test_segmentation_heads_tiny_mode_trains_each_head_on_frozen_features(capsys):
    rows = _load("segmentation_heads").main(["--tiny"])
    out = capsys.readouterr().out
    assert "| head | test mIoU |" in out and [r["head"] for r in rows] == ["linear", "linear_ms", "dpt"]
    assert all(0 <= r["miou"] <= 1 and r["ips"] > 0 for r in rows)
    # frozen: only the head trains, and the linear heads are a BatchNorm and a 1x1 conv (4 classes)
    assert rows[0]["trainable"] == 2 * 32 + 32 * 4 + 4 and rows[1]["trainable"] == 2 * 64 + 64 * 4 + 4


@pytest.mark.slow
def test_default_run_repeats_train_py_over_seeds_and_prints_mean_and_spread(capsys):
    rows = _load("default_run").main(["--seeds", "0", "1", "--trainer.max_epochs", "1",
                                      "--trainer.limit_train_batches", "3", "--model.backbone.depth", "1"])
    out = capsys.readouterr().out
    assert [r["seed"] for r in rows] == [0, 1] and all(r["images"] == 359 for r in rows)
    assert all(0.0 <= r["acc"] <= 1.0 and r["wall_s"] > 0 for r in rows)
    assert "| seed | test accuracy | wall time (s) |" in out and "| mean (min-max) |" in out
    assert "--trainer.max_epochs 1" in out  # the table names the command it measured
    assert re.search(r"fp32 matmul before the runs: \d+ GFLOP/s", out)  # the machine's speed beside the times
