from pathlib import Path

import numpy as np
import pytest
import torch

from smim_dist.targets.hog import HOGTarget

FIXTURE = Path(__file__).parent / "fixtures" / "hog_reference.npz"


def _reference():
    ref = np.load(FIXTURE)
    pixels = torch.from_numpy(ref["images_uint8_nhwc"]).float()
    images = (pixels - torch.from_numpy(ref["mean"])) / torch.from_numpy(ref["std"])
    return images.permute(0, 3, 1, 2).contiguous(), torch.from_numpy(ref["hog"])


def test_matches_reference_implementation():
    images, expected = _reference()
    hog = HOGTarget()
    out = hog(images)
    assert out.dtype == torch.float32
    assert out.shape == expected.shape == (3, 196, hog.out_dim)
    assert (out - expected).abs().max().item() < 1e-4


def test_non_square_images_give_unit_or_zero_histograms():
    torch.manual_seed(0)
    images = torch.randn(2, 3, 160, 224)
    images[:, :, :, :112] = 0.5  # flat left half: no gradient, so its histograms are zero
    hog = HOGTarget()
    out = hog(images)
    assert out.shape == (2, 10 * 14, 108)
    assert torch.isfinite(out).all()
    # Feature order per patch is (channel, bin, cell_row, cell_col); bins of each (channel, cell) are L2-normalized.
    norms = out.view(2, 10, 14, 3, 9, 2, 2).norm(dim=4)
    assert torch.allclose(norms[:, :, 8:], torch.ones_like(norms[:, :, 8:]), atol=1e-5)
    assert (norms[:, :, :6] == 0).all()  # patches whose Sobel support stays inside the flat half


def test_patches_are_row_major():
    images = torch.zeros(1, 3, 64, 96)
    images[:, :, 16 + 4 : 32 - 4, 48 + 4 : 64 - 4] = torch.rand(3, 8, 8)  # texture inside patch (row 1, col 3) only
    out = HOGTarget()(images)
    nonzero = out[0].abs().sum(dim=-1).nonzero().flatten().tolist()
    assert nonzero == [1 * 6 + 3]


def test_other_geometry():
    hog = HOGTarget(patch_size=16, nbins=6, cell_size=4, gaussian_window=16)
    assert hog.out_dim == 3 * 6 * 4 * 4
    out = hog(torch.randn(1, 3, 32, 48))
    assert out.shape == (1, 6, hog.out_dim)
    assert torch.isfinite(out).all()


def test_bf16_input_is_computed_in_float32():
    images, _ = _reference()
    hog = HOGTarget()
    out = hog(images.bfloat16())
    assert out.dtype == torch.float32
    # Computing in float32 means the only difference from fp32 input is the rounding of the input itself.
    assert torch.equal(out, hog(images.bfloat16().float()))
    # That rounding is about one 8-bit pixel step, which reshuffles the bins of near-flat cells only.
    cosine = torch.nn.functional.cosine_similarity(out, hog(images), dim=-1)
    assert cosine.median().item() > 0.99


def test_kernels_are_non_persistent_buffers():
    hog = HOGTarget()
    assert hog.state_dict() == {}
    assert {name for name, _ in hog.named_buffers()} == {"sobel_x", "sobel_y", "window"}
    assert torch.isclose(hog.window.sum(), torch.tensor(1.0))


@pytest.mark.parametrize("size", [(224, 200), (100, 224)])
def test_rejects_size_not_multiple_of_patch(size):
    with pytest.raises(ValueError, match=f"{size[0]}x{size[1]}"):
        HOGTarget()(torch.zeros(1, 3, *size))


def test_rejects_size_not_multiple_of_gaussian_window():
    with pytest.raises(ValueError, match="24x24"):
        HOGTarget(patch_size=8, cell_size=8, gaussian_window=16)(torch.zeros(1, 3, 24, 24))


@pytest.mark.parametrize("shape", [(1, 1, 224, 224), (3, 224, 224), (1, 4, 224, 224)])
def test_rejects_non_rgb_batches(shape):
    with pytest.raises(ValueError, match="3, H, W"):
        HOGTarget()(torch.zeros(shape))


def test_rejects_integer_pixels():
    with pytest.raises(ValueError, match="float"):
        HOGTarget()(torch.zeros(1, 3, 224, 224, dtype=torch.uint8))


@pytest.mark.parametrize(
    "kwargs, bad",
    [
        ({"patch_size": 12}, "12"),
        ({"cell_size": 0}, "cell_size"),
        ({"nbins": 2.5}, "nbins"),
        ({"gaussian_window": 1}, "gaussian_window"),
    ],
)
def test_rejects_bad_arguments(kwargs, bad):
    with pytest.raises(ValueError, match=bad):
        HOGTarget(**kwargs)
