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
