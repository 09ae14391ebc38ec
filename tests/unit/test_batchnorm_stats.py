"""BatchNorms folded to identities get their data's statistics back, computing the same function."""

import copy

import pytest
import torch
from torch import nn

from attnserve.models.batchnorm_stats import batchnorms, recalibrate, recalibrate_checkpoint


def _folded() -> nn.Sequential:
    """A conv + BatchNorm as a rebuilt entry holds it: the BatchNorm an identity carrying a bias."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
    bn = model[1]
    with torch.no_grad():
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0 - bn.eps)
        bn.weight.fill_(1.0)
        bn.bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
    return model


def _data(n: int) -> torch.Tensor:
    return 0.5 + 2.0 * torch.rand(n, 1, 12, 12)  # far from mean 0, variance 1


def test_eval_output_is_unchanged_and_train_mode_now_agrees_with_it():
    model, batches = _folded(), [(_data(64),) for _ in range(8)]
    probe = _data(256)
    model.eval()
    before = model(probe)
    unchanged = copy.deepcopy(model).train()  # a train-mode call moves the running statistics
    drift_before = (unchanged(probe) - before).abs().mean()
    model.train()
    assert recalibrate(model, batches, lambda m, x: m(x)) == 1
    assert model.training  # put back in its mode
    model.eval()
    assert torch.allclose(model(probe), before, atol=1e-5)
    model.train()
    assert (model(probe) - before).abs().mean() < 0.05 * drift_before


def test_running_statistics_are_the_datas():
    model, data = _folded(), _data(128)
    recalibrate(model, [(data,)], lambda m, x: m(x))
    features = model[0](data).transpose(0, 1).flatten(1)  # (4, everything)
    bn = batchnorms(model)[0]
    assert torch.allclose(bn.running_mean, features.mean(1), atol=1e-5)
    assert torch.allclose(bn.running_var, features.var(1, unbiased=False), atol=1e-4)


def test_a_batchnorm_that_sees_nothing_is_an_error():
    model = nn.Sequential(_folded(), nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match="saw no input"):
        recalibrate(model, [(_data(8),)], lambda m, x: m[0](x))


def test_a_rebuilt_captioner_checkpoint_keeps_its_function_and_trains_from_its_statistics(tmp_path):
    import numpy as np

    from attnserve.export.pipeline import checkpoint_from_entry
    from attnserve.models import scenes_data
    from attnserve.models.checkpoint import load_checkpoint
    from attnserve.models.tasks import task
    from tests.conftest import bundled_entry

    path = checkpoint_from_entry(bundled_entry("caption-fashion"), tmp_path / "start.pt")
    rebuilt = load_checkpoint(path)[0]
    assert recalibrate_checkpoint(path, task("caption", max_shift=2), examples=256) == 7  # 1 + 2 x 2 + 2
    model = load_checkpoint(path)[0]
    images = torch.from_numpy(np.stack([s.image for s in scenes_data.generate("dev", 64, 0)])[:, None])
    with torch.no_grad():
        want = rebuilt.encode(images)[0]
        assert torch.allclose(model.encode(images)[0], want, atol=1e-4)
        far, near = rebuilt.train().encode(images)[0], model.train().encode(images)[0]
    assert (near - want).abs().mean() < 0.2 * (far - want).abs().mean()
