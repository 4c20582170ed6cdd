"""torch.compile (inductor) gives the same outputs and gradients as eager."""
import pytest
import torch
import torch.nn.functional as F

import vit


@pytest.mark.slow
def test_compiled_and_eager_agree_for_inference_and_training(tiny_kwargs):
    torch.manual_seed(0)
    eager = vit.VisionTransformer(**tiny_kwargs, drop_path_rate=0.0)
    compiled = vit.VisionTransformer(**tiny_kwargs)
    compiled.load_state_dict(eager.state_dict())
    compiled.compile()  # in place, so the state-dict keys stay unprefixed
    assert set(compiled.state_dict()) == set(eager.state_dict())
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))

    eager.eval(), compiled.eval()
    with torch.inference_mode():
        torch.testing.assert_close(compiled(x), eager(x), atol=1e-5, rtol=1e-5)

    eager.train(), compiled.train()
    F.cross_entropy(eager(x), y).backward()
    F.cross_entropy(compiled(x), y).backward()
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.slow  # inductor compiles the forward and backward: about half a minute on 2 CPU cores
def test_model_compile_flag_trains_compiled_and_saves_plain_keys(tmp_path, monkeypatch):
    """README's training flag `--model.compile true`: the fit runs the compiled model, the loss is finite and the
    checkpoint's keys carry no `_orig_mod.` (so it loads into an eager model)."""
    from conftest import QUICK

    from vit.training.cli import DEFAULT_CONFIG, main
    monkeypatch.chdir(tmp_path)
    app = main(["fit", "--config", str(DEFAULT_CONFIG), *QUICK, "--model.compile", "true"])
    model = app.model.model
    assert model._compiled_call_impl is not None  # nn.Module.compile() in place
    assert torch.isfinite(app.trainer.callback_metrics["train/loss"])
    state = torch.load(next(tmp_path.rglob("last.ckpt")), weights_only=True)["state_dict"]
    assert state and not any("_orig_mod" in key for key in state)
    eager = vit.VisionTransformer(img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2, mlp_ratio=2.0,
                                  num_classes=10)  # digits.yaml's MLP ratio
    eager.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
