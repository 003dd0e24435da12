"""trainer.data.loaders.Normalizer: the uint8 -> normalized float32 conversion of every loader.

The reference here is the textbook arithmetic on an N x C x H x W float tensor with (1, C, 1, 1)
constants; the Normalizer's channels_last path computes it over a tiled N x H x (W*C) view instead,
which must give the very same floats.
"""

from __future__ import annotations

import pytest
import torch

from trainer.data.loaders import Normalizer

MEAN, STD = [73.5, 80.25, 91.0], [60.1, 61.7, 59.3]


def reference(images: torch.Tensor, mean, std) -> torch.Tensor:
    c = len(mean)
    inv_std = (1.0 / torch.tensor(std, dtype=torch.float64)).to(torch.float32).view(1, c, 1, 1)
    x = images.contiguous().to(torch.float32)
    return (x - torch.tensor(mean, dtype=torch.float32).view(1, c, 1, 1)) * inv_std


def batches(c: int, seed: int = 0):
    """uint8 batches of odd sizes, stored NHWC (FFCV's and the memory loader's buffers) and NCHW."""
    g = torch.Generator().manual_seed(seed)
    for n, h, w in ((4, 5, 7), (2, 9, 3), (1, 1, 1), (3, 16, 16)):
        nhwc = torch.randint(0, 256, (n, h, w, c), dtype=torch.uint8, generator=g)
        yield nhwc.permute(0, 3, 1, 2)  # channels_last strides, no copy
        yield nhwc.permute(0, 3, 1, 2).contiguous()  # plain NCHW


@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("channels_last", [True, False])
def test_same_floats_as_the_textbook_arithmetic(channels: int, channels_last: bool) -> None:
    mean, std = MEAN[:channels], STD[:channels]
    norm = Normalizer(mean, std, device=torch.device("cpu"), channels_last=channels_last)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for images in batches(channels):  # several widths in turn: the tiled constants are per width
        before = images.clone()
        x = norm(images)
        assert x.dtype == torch.float32 and x.shape == images.shape and x.is_contiguous(memory_format=fmt)
        assert torch.equal(x, reference(images, mean, std))  # bitwise, not approximately
        ref64 = (images.double() - torch.tensor(mean, dtype=torch.float64).view(1, -1, 1, 1)) / torch.tensor(
            std, dtype=torch.float64
        ).view(1, -1, 1, 1)
        assert torch.allclose(x.double(), ref64, rtol=0, atol=1e-5)  # and it is (x - mean) / std
        x.fill_(0)
        assert torch.equal(images, before)  # new storage: the source buffer is never written


def test_layouts_agree_and_wrong_input_is_refused() -> None:
    images = next(batches(3))
    a = Normalizer(MEAN, STD, device=torch.device("cpu"), channels_last=True)(images)
    b = Normalizer(MEAN, STD, device=torch.device("cpu"), channels_last=False)(images)
    assert torch.equal(a, b)
    norm = Normalizer(MEAN, STD, device=torch.device("cpu"), channels_last=True)
    for bad in (images.float(), images[0], images[:, :1]):
        with pytest.raises(ValueError, match="images: expected uint8 N x 3 x H x W"):
            norm(bad)
