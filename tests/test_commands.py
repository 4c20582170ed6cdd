"""The one `vit` command: every job behind it, each with --help, errors on one line with exit code 2."""
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from vit.commands import COMMANDS, main

REPO = Path(__file__).resolve().parent.parent


def test_help_lists_every_job_with_one_line(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    listed = [line.split()[0] for line in out.split("commands:")[1].strip().splitlines()]
    assert listed == list(COMMANDS)
    assert {"train", "predict", "embed", "probe", "search", "convert", "export", "visualize", "shards"} <= set(listed)
    for name, (_, about) in COMMANDS.items():
        assert f"  {name}" in out and about in out


@pytest.mark.parametrize("name", [n for n in COMMANDS if n != "train"])
def test_every_job_has_help(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: vit {name}" in capsys.readouterr().out


def test_train_help_is_the_training_cli(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "fit", "--help"])
    assert exit_info.value.code == 0
    assert "--model.backbone.embed_dim" in capsys.readouterr().out


def test_unknown_job_and_bad_argument_are_one_line_with_exit_code_2(capsys):
    assert main(["nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown command 'nope'" in err and "predict" in err
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "cat.png", "--checkpoint", "x", "--topk", "many"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("vit predict: error:") and "--topk" in err
    assert main([]) == 2  # no job: the list, and a failure code for scripts


def test_python_dash_m_vit_and_the_console_script_run_the_same_main():
    proc = subprocess.run([sys.executable, "-m", "vit", "--help"], capture_output=True, text=True, timeout=120,
                          cwd=REPO)
    assert proc.returncode == 0 and "visualize" in proc.stdout
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"vit": "vit.commands:main"}
    proc = subprocess.run([sys.executable, "-m", "vit", "convert", "missing.pth", "out"], capture_output=True,
                          text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_no_python_dash_m_module_spelling_is_left():
    """`python -m vit.X` was replaced by `vit X` everywhere at once (README, docs, code, tests, benchmarks)."""
    stale = []
    for path in [*REPO.glob("*.md"), *(REPO / "docs").rglob("*.md"), *(REPO / "vit").rglob("*.py"),
                 *(REPO / "benchmarks").glob("*.py"), *(REPO / "examples").glob("*.py"), *(REPO / "configs").rglob("*.yaml")]:
        text = path.read_text(encoding="utf-8")
        stale += [f"{path.relative_to(REPO)}" for marker in ("python -m vit.", '"-m", "vit.') if marker in text]
    assert not stale, stale


def test_export_refuses_an_onnx_file_that_differs_from_pytorch(tmp_path, capsys, monkeypatch):
    """`vit export --onnx` checks the written file against PyTorch and exits 1 above --tolerance (1e-4): here the
    exporter is handed a copy whose head bias moved by 1e-3, as a faulty export would."""
    import copy

    import torch

    import vit
    from vit.commands import export as export_command
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = vit.VisionTransformer(img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=3)
    source = vit.save_pretrained(model, tmp_path / "m")
    real_export = export_command.export_onnx_newest

    def faulty_export(model, path, opset=None):
        shifted = copy.deepcopy(model)
        with torch.no_grad():
            shifted.head.bias.add_(1e-3)
        return real_export(shifted, path, opset)

    assert export_command.main([str(source), "--onnx", str(tmp_path / "ok.onnx")]) == 0  # the control run
    capsys.readouterr()
    monkeypatch.setattr(export_command, "export_onnx_newest", faulty_export)
    assert export_command.main([str(source), "--onnx", str(tmp_path / "bad.onnx")]) == 1
    err = capsys.readouterr().err
    assert "differs from PyTorch by 1.0" in err and "> 0.0001" in err


def test_recipes_and_their_comments_use_the_backbone_keys():
    """Every recipe parses, and no comment in one shows a flat key that moved under model.backbone."""
    import re

    from vit.training.cli import MOVED_TO_BACKBONE
    for recipe in (REPO / "configs").rglob("*.yaml"):
        text = recipe.read_text(encoding="utf-8")
        stale = re.findall(rf"--model\.({'|'.join(MOVED_TO_BACKBONE)})\b", text)
        assert not stale, f"{recipe.name}: --model.{stale[0]} is now --model.backbone.{stale[0]}"
