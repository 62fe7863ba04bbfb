import pytest
import torch

from l2o_kd.errors import UserError
from l2o_kd.models import apply, build_model, count_params, split_state


@pytest.mark.parametrize("name,expected", [("tiny", 15_050), ("tiny_wide", 26_538), ("tiny_narrow", 8_674), ("tiny_deep", 24_362), ("small", 94_986), ("resnet8", 75_290),
                                           ("resnet20", 269_722), ("resnet56", 853_018)])
def test_parameter_counts(name, expected):
    model = build_model(name)
    assert count_params(model) == expected
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_seeded_init_is_reproducible_and_seeds_differ():
    a, b, c = (split_state(build_model("tiny", seed=s))[0] for s in (1, 1, 2))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["features.0.weight"], c["features.0.weight"])


def test_functional_forward_matches_module_and_updates_batchnorm_buffers():
    model = build_model("tiny", seed=0)
    params, buffers = split_state(model)
    x = torch.randn(16, 3, 32, 32)
    model.train()
    expected = model(x)
    before = buffers["features.1.running_mean"].clone()
    out = apply(model, params, buffers, x, train=True)
    assert torch.allclose(out, expected, atol=1e-6)
    assert not torch.equal(buffers["features.1.running_mean"], before)  # running stats moved
    assert torch.allclose(buffers["features.1.running_mean"], model.features[1].running_mean)
    model.eval()
    assert torch.allclose(apply(model, params, buffers, x, train=False), model(x), atol=1e-6)


def test_unknown_model_is_a_user_error():
    with pytest.raises(UserError, match="unknown model"):
        build_model("resnet9000")
