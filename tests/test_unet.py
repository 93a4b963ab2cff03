"""The shared U-Net: shape contract, conditioning, gradients and per-sample independence."""

from __future__ import annotations

import pytest
import torch

from domains.embedding import sinusoidal_embedding
from domains.unet import UNet, build_unet
from polydiff.conditioning import NULL_LABEL

torch.set_num_threads(2)


def _tiny(dims: int, in_channels: int, **kw) -> UNet:
    cfg = dict(channels=8, channel_mults=(1, 2, 2), num_res_blocks=1, attention_levels=(1,), num_heads=2)
    cfg.update(kw)
    return UNet(dims, in_channels, **cfg)


def _perturb_head(net: UNet, seed: int = 0) -> None:
    """The output conv starts at zero; give it weights so the rest of the net becomes visible."""
    g = torch.Generator().manual_seed(seed)
    conv = net.head[-1]
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.1)
        conv.bias.copy_(torch.randn(conv.bias.shape, generator=g) * 0.1)


def _num_params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize("channels_in", [1, 2])
@pytest.mark.parametrize("length", [1, 999, 4000])
def test_1d_output_matches_input_shape(channels_in: int, length: int) -> None:
    net = _tiny(1, channels_in, down_factors=4)
    _perturb_head(net)
    x = torch.randn(2, channels_in, length)
    y = net(x, torch.rand(2))
    assert y.shape == x.shape
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("channels_in", [1, 3])
@pytest.mark.parametrize("size", [(7, 9), (8, 8), (28, 28)])
def test_2d_output_matches_input_shape(channels_in: int, size: tuple[int, int]) -> None:
    net = _tiny(2, channels_in)
    _perturb_head(net)
    x = torch.randn(2, channels_in, *size)
    y = net(x, torch.rand(2))
    assert y.shape == x.shape
    assert torch.isfinite(y).all()


def test_3d_and_per_level_factors_and_out_channels() -> None:
    net = _tiny(3, 2, channel_mults=(1, 2), attention_levels=())
    assert net(torch.randn(1, 2, 5, 6, 7), torch.rand(1)).shape == (1, 2, 5, 6, 7)
    net = _tiny(1, 1, down_factors=(4, 2), out_channels=3)
    assert net.total_factor == 8
    assert net(torch.randn(2, 1, 101), torch.rand(2)).shape == (2, 3, 101)


def test_untrained_output_is_zero() -> None:
    net = _tiny(1, 1)
    assert torch.count_nonzero(net(torch.randn(2, 1, 64), torch.rand(2))) == 0


def test_labels_condition_output_and_null_equals_none() -> None:
    torch.manual_seed(0)
    net = _tiny(2, 1, num_classes=3).eval()
    _perturb_head(net)
    x, t = torch.randn(2, 1, 8, 8), torch.rand(2)
    y0 = net(x, t, torch.tensor([0, 0]))
    y1 = net(x, t, torch.tensor([1, 1]))
    assert not torch.allclose(y0, y1, atol=1e-4)
    y_null = net(x, t, torch.full((2,), NULL_LABEL))
    y_none = net(x, t, None)
    torch.testing.assert_close(y_null, y_none, rtol=0, atol=0)
    assert not torch.allclose(y_null, y0, atol=1e-4)
    # A mixed batch treats each sample's label on its own.
    y_mix = net(x, t, torch.tensor([0, NULL_LABEL]))
    torch.testing.assert_close(y_mix[0], y0[0])
    torch.testing.assert_close(y_mix[1], y_none[1])


def test_bad_labels_and_inputs_raise_clear_errors() -> None:
    net = _tiny(1, 1, num_classes=3)
    x, t = torch.randn(2, 1, 16), torch.rand(2)
    with pytest.raises(ValueError, match="out of range"):
        net(x, t, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="label must be an integer"):
        net(x, t, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="expected x of shape"):
        net(torch.randn(2, 2, 16), t)
    with pytest.raises(ValueError, match="t must have shape"):
        net(x, torch.rand(()))
    with pytest.raises(ValueError, match="num_classes=0"):
        _tiny(1, 1)(x, t, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="down_factors"):
        _tiny(1, 1, down_factors=(2, 2, 2))
    with pytest.raises(ValueError, match="num_heads"):
        _tiny(1, 1, num_heads=3)
    with pytest.raises(ValueError, match="attention_levels"):
        _tiny(1, 1, attention_levels=(5,))


def test_time_changes_output() -> None:
    net = _tiny(1, 1).eval()
    _perturb_head(net)
    x = torch.randn(1, 1, 64).expand(2, 1, 64)
    y = net(x, torch.tensor([0.1, 0.9]))
    assert not torch.allclose(y[0], y[1], atol=1e-4)


def test_gradients_reach_every_parameter() -> None:
    torch.manual_seed(0)
    net = _tiny(1, 1, num_classes=2, down_factors=(4, 2), dropout=0.1)
    _perturb_head(net)
    x = torch.randn(3, 1, 50)
    y = net(x, torch.rand(3), torch.tensor([0, 1, NULL_LABEL]))
    (y**2).mean().backward()
    dead = [n for n, p in net.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert not dead, f"parameters without gradient: {dead}"


def test_samples_in_a_batch_do_not_interact() -> None:
    torch.manual_seed(0)
    net = _tiny(2, 3, num_classes=2).eval()
    _perturb_head(net)
    x = torch.randn(3, 3, 9, 7, requires_grad=True)
    y = net(x, torch.rand(3), torch.tensor([1, NULL_LABEL, 0]))
    y[1].sum().backward()
    assert torch.count_nonzero(x.grad[0]) == 0 and torch.count_nonzero(x.grad[2]) == 0
    assert torch.count_nonzero(x.grad[1]) > 0


def test_parameter_count_grows_with_width_and_features() -> None:
    small = _num_params(_tiny(1, 1, channels=16))
    wide = _num_params(_tiny(1, 1, channels=32))
    # Convolutions dominate, so doubling the width should roughly quadruple the count.
    assert 3.5 * small < wide <= 4 * small
    # The label table is num_classes + 1 rows (one null row) of the 4*channels embedding.
    labelled = _num_params(_tiny(1, 1, channels=16, num_classes=10))
    assert labelled - small == 11 * 4 * 16
    no_attention = _num_params(_tiny(1, 1, channels=16, attention_levels=(), mid_attention=False))
    assert no_attention < small
    # The spatial rank changes kernel sizes, not the layer layout.
    assert _num_params(_tiny(2, 1, channels=16)) > small


def test_build_unet_takes_dims_channels_and_classes_from_the_domain() -> None:
    """The domains' one builder: the data's dims, channels and classes, the recipe's rest, checked by name."""
    net = build_unet(1, 2, 3, {"channels": 8, "channel_mults": (1, 2), "num_res_blocks": 1}, "audio")
    assert (net.dims, net.in_channels, net.num_classes) == (1, 2, 3)
    for key in ("dims", "in_channels", "num_classes"):
        with pytest.raises(KeyError, match=f"model.{key} is set by the image domain from the data"):
            build_unet(2, 3, 0, {key: 1}, "image")
    with pytest.raises(KeyError, match="model.chanels"):  # a misspelt key: call_checked names it
        build_unet(2, 3, 0, {"chanels": 8}, "image")


def test_a_padded_input_is_cropped_back_where_it_was() -> None:
    """Any length is padded at the end to the network's multiple and cropped back from the start: a clip of 999
    samples and the same clip padded with one zero by hand give the same first 999 outputs."""
    net = _tiny(1, 1, down_factors=4).eval()
    _perturb_head(net)
    x, t = torch.randn(2, 1, 999), torch.rand(2)
    padded = torch.nn.functional.pad(x, (0, 1))
    with torch.no_grad():
        torch.testing.assert_close(net(x, t), net(padded, t)[..., :999])


def test_sinusoidal_embedding_frequencies_order_and_odd_width():
    """Column k is cos(t * 10000^(-k / (half - shift))), then the sines; sin_first swaps the halves; odd widths pad."""
    t = torch.tensor([0.0, 3.0])
    emb = sinusoidal_embedding(t, 9)  # half = 4, one zero column
    assert emb.shape == (2, 9) and torch.equal(emb[:, -1], torch.zeros(2))
    assert torch.equal(emb[0, :8], torch.tensor([1.0] * 4 + [0.0] * 4))
    freqs = torch.tensor([10000.0 ** (-k / 4) for k in range(4)])
    torch.testing.assert_close(emb[1, :4], torch.cos(3.0 * freqs))
    torch.testing.assert_close(emb[1, 4:8], torch.sin(3.0 * freqs))
    shifted = sinusoidal_embedding(t, 8, shift=1, sin_first=True)
    freqs = torch.tensor([10000.0 ** (-k / 3) for k in range(4)])  # the last frequency is 1 / max_period
    torch.testing.assert_close(shifted[1], torch.cat([torch.sin(3.0 * freqs), torch.cos(3.0 * freqs)]))
