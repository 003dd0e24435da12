"""Model registry and zoo: every registered model builds, runs forward and backward with a finite
gradient for every parameter, and the paper variants have the published parameter counts.

Expected values come from torchvision (ResNet-18/34/50/101/152, VGG-16/19 (BN), ViT-B/L layouts),
published figures (WRN-28-10 36.48 M with 1×1 shortcuts, Shake-Shake 26 2×96d 26.2 M, the
PyramidNet paper's counts, timm's ViT-Ti/S), hand arithmetic of each family's layout as its module
docstring states it (written out below), and hand computations on small tensors.
"""

from __future__ import annotations

import math
import time

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from trainer.models import (
    create_model,
    debug_variant,
    debug_variants,
    list_models,
    model_family,
    model_options,
    register_debug_variant,
    register_model,
    registry,
)
from trainer.models.layers import shake_drop
from trainer.models.pyramidnet import PyramidBottleneck, ShakeDropBlock, pool_pad, pyramid_widths
from trainer.models.shakeshake import ShakeShakeBlock, ShiftedProjection
from trainer.models.vit import Attention
from trainer.models.wideresnet import pool_pad_shortcut

PAPER_NAMES = {
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnet200",
    "wrn16_4",
    "wrn28_10",
    "wrn40_10",
    "vgg16",
    "vgg16_bn",
    "vgg19",
    "vgg19_bn",
    "wrn26_2x96_shakeshake",
    "pyramidnet164_48",
    "pyramidnet164_270",
    "pyramidnet200_240",
    "pyramidnet272_200",
    "pyramidnet164_48_shakedrop",
    "pyramidnet272_200_shakedrop",
    "vit_ti",
    "vit_s",
    "vit_b",
    "vit_l",
}
# Each family's tiny variant, as the registry declares it (checked by test_debug_variant_is_the_smallest_member).
DEBUG_NAMES = set(debug_variants().values())
ALL_NAMES = PAPER_NAMES | DEBUG_NAMES | {"demo_cnn"}


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> object:
    """Run this module single-threaded: the models here are small per call, and two OpenMP
    threads spin-waiting on a shared 2-core machine cost far more than they gain."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count(name: str, **kwargs: object) -> int:
    """Parameter count of ``create_model(name, **kwargs)`` built on the meta device: the count
    tests need shapes only, and skipping the real initialisation of ~60 M parameters per model
    keeps this file fast (the forward/backward test builds every model for real)."""
    with torch.device("meta"):
        return n_params(create_model(name, **kwargs))  # type: ignore[arg-type]


def tv_count(arch: str) -> int:
    """Parameter count of ``torchvision.models.<arch>()`` (1000 classes), built on meta."""
    with torch.device("meta"):
        return n_params(getattr(torchvision.models, arch)())


# --------------------------------------------------------------------------- arithmetic models
def resnet_param_count(block: str, layers: list[int], num_classes: int, stem: str, bias: bool) -> int:
    """Parameters of the ResNet layout (``resnet.py``), by hand: stem conv (no bias) + BN; per block its convs
    (+ bias if ``bias``) and BNs (γ, β); a conv1×1 + BN projection whenever the block changes the
    shape (stride 2, or a channel change — this includes the first block after the 16-channel
    CIFAR stem); classifier weight + bias."""
    if stem == "cifar":
        channels, total = 16, 3 * 16 * 3 * 3 + 2 * 16
    else:
        channels, total = 64, 3 * 64 * 7 * 7 + 2 * 64
    for i, depth in enumerate(layers):
        width = 64 * 2**i
        for j in range(depth):
            stride = 2 if i > 0 and j == 0 else 1
            if block == "basic":
                out, convs = width, [(channels, width, 9), (width, width, 9)]
            else:
                out, convs = 4 * width, [(channels, width, 1), (width, width, 9), (width, 4 * width, 1)]
            if stride != 1 or channels != out:
                convs.append((channels, out, 1))
            for cin, cout, k in convs:
                total += cin * cout * k + 2 * cout + (cout if bias else 0)
            channels = out
    return total + channels * num_classes + num_classes


def wrn_param_count(depth: int, k: int, num_classes: int) -> int:
    """Parameters of WRN-depth-k with the parameter-free (pool + zero-pad) shortcut: stem conv
    3·16·9; per block BN(c_in) + conv3×3(c_in→w) + BN(w) + conv3×3(w→w), no biases; final BN;
    classifier."""
    n = (depth - 4) // 6
    total, channels = 3 * 16 * 9, 16
    for width in (16 * k, 32 * k, 64 * k):
        for _ in range(n):
            total += 2 * channels + 9 * channels * width + 2 * width + 9 * width * width
            channels = width
    return total + 2 * channels + channels * num_classes + num_classes


# --------------------------------------------------------------------------- registry
def test_expected_names_registered() -> None:
    # Subset checks: the zoo issue adds families without editing this test.
    names = list_models()
    assert ALL_NAMES <= set(names)
    assert names == sorted(names)
    wrns = list_models("wrn*")
    assert {"wrn16_4", "wrn28_10", "wrn40_10", "wrn_debug"} <= set(wrns)
    assert all(n.startswith("wrn") for n in wrns) and wrns == sorted(wrns)
    assert list_models("nothing*") == []


def test_unknown_name_suggests_closest() -> None:
    with pytest.raises(ValueError, match=r"^model: unknown 'resnt50'; did you mean 'resnet50'\? available: .*resnet50"):
        create_model("resnt50", num_classes=10)
    with pytest.raises(ValueError, match=r"^model: unknown 'zzz'; available: "):
        create_model("zzz", num_classes=10)


def test_unknown_option_is_named() -> None:
    with pytest.raises(ValueError, match=r"unknown option\(s\) 'stme' for 'resnet50'; allowed: conv_bias, stem"):
        create_model("resnet50", num_classes=10, stme="cifar")
    # A ResNet option is not a WRN option.
    with pytest.raises(ValueError, match=r"'stem' for 'wrn28_10'; allowed: dropout"):
        create_model("wrn28_10", num_classes=10, stem="cifar")


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "10"])
def test_invalid_num_classes(bad: object) -> None:
    with pytest.raises(ValueError, match="num_classes must be a positive integer"):
        create_model("resnet_debug", num_classes=bad)  # type: ignore[arg-type]


def test_invalid_option_values() -> None:
    with pytest.raises(ValueError, match="stem must be one of cifar, imagenet"):
        create_model("resnet_debug", num_classes=10, stem="imgnet")
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        create_model("wrn_debug", num_classes=10, dropout=1.0)
    with pytest.raises(ValueError, match="block must be one of basic, bottleneck"):
        create_model("resnet_debug", num_classes=10, block="wide")


def test_duplicate_registration_raises_and_keeps_original() -> None:
    original = registry._REGISTRY["resnet50"]
    with pytest.raises(ValueError, match="'resnet50' is already registered"):
        register_model("resnet50")(lambda **kw: nn.Linear(1, 1))
    assert registry._REGISTRY["resnet50"] is original


def test_register_and_create_custom_model(monkeypatch: pytest.MonkeyPatch) -> None:
    # A private copy of the registry, so the global one (and list_models() elsewhere) is untouched.
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    @register_model("tiny_linear")
    def tiny_linear(*, num_classes: int, in_channels: int = 3, image_size: int = 32, bias: bool = True) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size**2, num_classes, bias=bias))

    assert "tiny_linear" in list_models("tiny_*")
    assert model_options("tiny_linear") == {"bias": True}
    model = create_model("tiny_linear", num_classes=4, in_channels=1, image_size=5, bias=False)
    assert n_params(model) == 25 * 4
    with pytest.raises(ValueError, match="already registered"):
        register_model("tiny_linear")(tiny_linear)


def test_debug_variant_is_the_smallest_member_of_every_family() -> None:
    families = {model_family(n) for n in list_models()}
    assert families >= {"demo", "pyramidnet", "resnet", "shakeshake", "vgg", "vit", "wideresnet"}
    assert set(debug_variants()) == families  # a family added without a debug variant fails here
    for family, debug in debug_variants().items():
        members = [n for n in list_models() if model_family(n) == family]
        assert debug in members
        assert all(debug_variant(n) == debug for n in members)
        # what "debug variant" promises, measured: no member of the family is smaller
        sizes = {n: count(n, num_classes=10) for n in members}
        assert sizes[debug] == min(sizes.values()), (family, sizes)
    # the family is the registering module, not a name prefix: the Shake-Shake WRN is not a `wrn`
    assert model_family("wrn26_2x96_shakeshake") == "shakeshake"
    assert debug_variant("wrn26_2x96_shakeshake") == "shakeshake_debug"
    assert debug_variant("wrn28_10") == "wrn_debug"
    assert debug_variant("pyramidnet272_200_shakedrop") == "pyramidnet_debug"


def test_debug_variant_declarations(monkeypatch: pytest.MonkeyPatch) -> None:
    # Private copies, so the global registry is untouched.
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_DEBUG", dict(registry._DEBUG))
    with pytest.raises(ValueError, match="^model: family 'resnet' already has the debug variant 'resnet_debug', not"):
        register_debug_variant("resnet18")
    register_debug_variant("resnet_debug")  # the same declaration again changes nothing
    assert debug_variant("resnet50") == "resnet_debug"
    with pytest.raises(ValueError, match="^model: unknown 'resnet_dbg'; did you mean 'resnet_debug'"):
        register_debug_variant("resnet_dbg")

    @register_model("tiny_linear")
    def tiny_linear(*, num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size**2, num_classes))

    assert model_family("tiny_linear") == __name__.rsplit(".", 1)[-1]
    with pytest.raises(ValueError, match=r"\(of 'tiny_linear'\) declares no debug variant; families with one: demo,"):
        debug_variant("tiny_linear")
    register_debug_variant("tiny_linear")
    assert debug_variant("tiny_linear") == "tiny_linear"
    assert debug_variants()[model_family("tiny_linear")] == "tiny_linear"


# --------------------------------------------------------------------------- every model
# (batch, side, image_size) for the forward/backward test. The convolutional paper variants run at
# 8 px and batch 2 (CIFAR stem, built with image_size=32) so that even ResNet-200 takes about a
# second on 2 cores; after three stride-2 stages the last feature map is 1×1, and 2 images still
# give train-mode BN two values per channel. VGG flattens its final map (five 2× poolings), so it
# needs 32 px; a ViT is built for one image size, and 8 px with the CIFAR patch 4 gives 4 tokens +
# cls, which keeps ViT-L (304 M parameters) to a few seconds.
SMALL_INPUT: dict[str, tuple[int, int, int]] = {
    **{name: (4, 32, 32) for name in DEBUG_NAMES},
    "demo_cnn": (4, 28, 32),
    **{name: (2, 32, 32) for name in ("vgg16", "vgg16_bn", "vgg19", "vgg19_bn")},
    **{name: (2, 8, 8) for name in ("vit_ti", "vit_s", "vit_b", "vit_l")},
}


# Building ViT-L (304 M parameters, Xavier init) and allocating its gradients takes ~8 s of CPU.
SLOW_FORWARD = {"vit_l"}


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_FORWARD else n for n in list_models()]
)
def test_forward_backward_every_param_has_grad(name: str) -> None:
    torch.manual_seed(0)
    batch, side, image_size = SMALL_INPUT.get(name, (2, 8, 32))
    num_classes = 7  # not 10/100/1000, so nothing can hide behind a class-count rule
    model = create_model(name, num_classes=num_classes, image_size=image_size)
    x = torch.randn(batch, 3, side, side)
    out = model(x)
    assert out.shape == (batch, num_classes)
    assert torch.isfinite(out).all()
    F.cross_entropy(out, torch.arange(batch) % num_classes).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing[:5]}"
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradients: {bad[:5]}"
    # Eval mode (running BN statistics) must also work and keep the shape.
    model.eval()
    with torch.no_grad():
        assert model(x[:1]).shape == (1, num_classes)


@pytest.mark.parametrize("name", sorted(DEBUG_NAMES))
def test_debug_variants_are_fast(name: str) -> None:
    # CPU time of this thread (torch runs single-threaded here), so other load on the machine
    # does not make the test flaky.
    model = create_model(name, num_classes=10)
    x = torch.randn(8, 3, 32, 32)
    model(x).sum().backward()  # warm-up
    start = time.thread_time()
    model(x).sum().backward()
    assert time.thread_time() - start < 0.5


def test_resnet_debug_basic_block_variant() -> None:
    model = create_model("resnet_debug", num_classes=5, block="basic")
    out = model(torch.randn(2, 3, 32, 32))
    out.sum().backward()
    assert out.shape == (2, 5)
    assert all(p.grad is not None for p in model.parameters())
    # basic blocks carry conv biases like ResNet-18/34
    assert model.stages[0][0].conv1.bias is not None


def test_wrn_dropout_option() -> None:
    torch.manual_seed(0)
    model = create_model("wrn_debug", num_classes=10, dropout=0.5)
    assert sum(isinstance(m, nn.Dropout) for m in model.modules()) == 3  # one per block, 1 block/group
    x = torch.randn(2, 3, 32, 32)
    a, b = model(x), model(x)
    assert not torch.allclose(a, b)  # masks differ between calls in train mode
    model.eval()
    assert torch.equal(model(x), model(x))


def test_bn_settings_everywhere() -> None:
    for family, name in debug_variants().items():
        if family == "vit":  # LayerNorm only
            continue
        model = create_model(name, num_classes=10)
        bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        assert bns
        assert all(m.momentum == 0.1 and m.eps == 1e-5 and m.affine for m in bns), name


# --------------------------------------------------------------------------- ResNet
def test_resnet50_imagenet_matches_torchvision() -> None:
    # torchvision's ResNet-50 (published 25.56 M): same stem conv/BN, bottlenecks without bias,
    # conv1×1+BN projections, 2048→1000 classifier. Stride placement and the stem ReLU do not
    # change the count.
    assert count("resnet50", num_classes=1000, stem="imagenet") == 25_557_032 == tv_count("resnet50")
    # image_size >= 128 picks the same stem by itself.
    assert count("resnet50", num_classes=1000, image_size=224) == 25_557_032


@pytest.mark.parametrize(
    "name, tv_name, expected",
    [("resnet101", "resnet101", 44_549_160), ("resnet152", "resnet152", 60_192_808)],
)
def test_deep_resnets_match_torchvision(name: str, tv_name: str, expected: int) -> None:
    assert count(name, num_classes=1000, stem="imagenet") == expected == tv_count(tv_name)


def test_resnet200_count() -> None:
    # Not in torchvision; hand arithmetic of [3, 24, 36, 3] bottlenecks with the ImageNet stem
    # (the usual published figure for ResNet-200 is 64.7 M).
    expected = resnet_param_count("bottleneck", [3, 24, 36, 3], 1000, "imagenet", bias=False)
    assert expected == 64_673_832
    assert count("resnet200", num_classes=1000, stem="imagenet") == expected


def test_resnet18_34_conv_bias() -> None:
    # Reference: basic-block convs (and the projection conv) have a bias, stems do not.
    # ResNet-18 biases: stage widths 64/128/256/512, 2 blocks × 2 convs each, plus one projection
    # in stages 2–4: 4·64 + 5·128 + 5·256 + 5·512 = 4,736 on top of torchvision's 11,689,512.
    with torch.device("meta"):
        r18 = create_model("resnet18", num_classes=1000, stem="imagenet")
    assert n_params(r18) == 11_689_512 + 4_736 == tv_count("resnet18") + 4_736
    assert r18.stem[0].bias is None and r18.stages[1][0].shortcut[0].bias is not None
    # Without the biases the layout is torchvision's exactly.
    assert count("resnet18", num_classes=1000, stem="imagenet", conv_bias=False) == 11_689_512
    # ResNet-34 biases: 6·64 + 9·128 + 13·256 + 7·512 = 8,448.
    assert count("resnet34", num_classes=1000, stem="imagenet") == tv_count("resnet34") + 8_448 == 21_797_672 + 8_448
    assert resnet_param_count("basic", [3, 4, 6, 3], 1000, "imagenet", bias=True) == 21_797_672 + 8_448


def test_resnet_cifar_stem_counts() -> None:
    # ResNet-18, CIFAR stem, 10 classes. From torchvision's 11,689,512: stem 3·64·49+128 → 3·16·9+32
    # (−9,072); first block conv1 sees 16 instead of 64 channels (−(64−16)·64·9 = −27,648) and needs
    # a 16→64 projection (16·64 + 64 bias + 128 BN = +1,216); classifier 512·1000+1000 → 512·10+10
    # (−507,870); conv biases +4,736. Total 11,150,874.
    expected18 = 11_689_512 - 9_072 - 27_648 + 1_216 - 507_870 + 4_736
    assert expected18 == 11_150_874 == resnet_param_count("basic", [2, 2, 2, 2], 10, "cifar", bias=True)
    with torch.device("meta"):
        r18 = create_model("resnet18", num_classes=10)  # image_size 32 → CIFAR stem
    assert n_params(r18) == expected18
    assert r18.stem[0].kernel_size == (3, 3) and r18.stem[0].out_channels == 16
    assert not any(isinstance(m, nn.ReLU) for m in r18.stem)  # reference: BN without ReLU
    assert isinstance(r18.stages[0][0].shortcut, nn.Sequential)  # 16 → 64 needs a projection
    # ResNet-50 of the resnet-cifar recipe (CIFAR-10): stem −9,072, first bottleneck conv1 and
    # projection see 16 instead of 64 channels (−48·64 − 48·256 = −15,360), classifier
    # 2048·10+10 instead of 2048·1000+1000 (−2,028,510). Total 23,504,090.
    expected50 = 25_557_032 - 9_072 - 15_360 - 2_028_510
    assert expected50 == 23_504_090 == resnet_param_count("bottleneck", [3, 4, 6, 3], 10, "cifar", bias=False)
    assert count("resnet50", num_classes=10) == expected50


def test_resnet_stem_choice_and_shapes() -> None:
    # stem=None: below 128 px the CIFAR stem, from 128 px the ImageNet stem; explicit stem wins.
    small = create_model("resnet_debug", num_classes=3, image_size=127)
    big = create_model("resnet_debug", num_classes=3, image_size=128)
    forced_cifar = create_model("resnet_debug", num_classes=3, image_size=224, stem="cifar")
    forced_imagenet = create_model("resnet_debug", num_classes=3, image_size=32, stem="imagenet")
    for model in (small, forced_cifar):
        assert model.stem[0].kernel_size == (3, 3) and model.stem[0].stride == (1, 1)
        assert model.stem[0].out_channels == 16
    for model in (big, forced_imagenet):
        assert model.stem[0].kernel_size == (7, 7) and model.stem[0].stride == (2, 2)
        assert model.stem[0].out_channels == 8  # the first stage's width (64 in the paper variants)
        assert isinstance(model.stem[2], nn.MaxPool2d) and not any(isinstance(m, nn.ReLU) for m in model.stem)
    # Feature maps: the CIFAR stem keeps 32 px and three stride-2 stages give 4 px; the ImageNet
    # stem divides by 4 first (64 px → 16 px → 2 px). Bottleneck output width 8·2³·4 = 256.
    with torch.no_grad():
        assert small.stages(small.stem(torch.randn(2, 3, 32, 32))).shape == (2, 256, 4, 4)
        assert big.stages(big.stem(torch.randn(2, 3, 64, 64))).shape == (2, 256, 2, 2)


def test_resnet_init_follows_reference() -> None:
    torch.manual_seed(0)
    model = create_model("resnet50", num_classes=100)
    conv = model.stages[3][0].conv2  # 512→512 3×3: 2.4 M samples
    fan_out = conv.out_channels * 9
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2.0 / fan_out), rel=0.01)
    assert conv.weight.mean().abs().item() < 0.01 * math.sqrt(2.0 / fan_out)
    bound = 1.0 / math.sqrt(100)  # U(−1/√K, 1/√K), K = num_classes
    w = model.fc.weight
    assert w.abs().max().item() <= bound
    assert w.abs().max().item() > 0.99 * bound
    assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.02)  # std of U(−b, b) = b/√3
    assert torch.count_nonzero(model.fc.bias) == 0
    r18 = create_model("resnet18", num_classes=10)
    conv_biases = [m.bias for m in r18.modules() if isinstance(m, nn.Conv2d) and m.bias is not None]
    # 16 block convs + 4 projections (stages 2–4, and 16 → 64 after the CIFAR stem), all zero.
    assert len(conv_biases) == 20 and all(torch.count_nonzero(b) == 0 for b in conv_biases)
    bn = model.stages[0][0].bn3
    assert torch.equal(bn.weight, torch.ones_like(bn.weight)) and torch.count_nonzero(bn.bias) == 0


# --------------------------------------------------------------------------- WideResNet
def test_wrn_counts() -> None:
    # WRN-28-10, 10 classes, zero-pad shortcuts: stem 432; group 1 (160 ch, 4 blocks):
    # BN(16) 32 + conv 16·160·9 = 23,040 + BN 320 + conv 160·160·9 = 230,400, then 3 × (320 +
    # 230,400 + 320 + 230,400); groups 2 and 3 likewise with 320 and 640 channels; final BN 1,280;
    # classifier 640·10 + 10. Total 36,220,634. The published 36.48 M (36,479,194) is the same
    # network with 1×1 projection convs on the three channel changes: 16·160 + 160·320 + 320·640
    # = 258,560 more parameters, which the reference's pool + zero-pad shortcut does not have.
    expected = wrn_param_count(28, 10, 10)
    assert expected == 36_220_634 == 36_479_194 - (16 * 160 + 160 * 320 + 320 * 640)
    assert count("wrn28_10", num_classes=10) == expected
    # WRN-16-4: published 2.75 M (2,748,890) with 1×1 convs 16·64 + 64·128 + 128·256 = 41,984;
    # here 2,706,906.
    assert wrn_param_count(16, 4, 10) == 2_706_906 == 2_748_890 - 41_984
    assert count("wrn16_4", num_classes=10) == 2_706_906
    # WRN-40-10: published 55.84 M (55,841,754) with the same 258,560 of 1×1 convs as WRN-28-10;
    # here 55,583,194.
    assert wrn_param_count(40, 10, 10) == 55_583_194 == 55_841_754 - 258_560
    assert count("wrn40_10", num_classes=10) == 55_583_194
    # No 1×1 convolutions anywhere.
    convs = [m for m in create_model("wrn_debug", num_classes=10).modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 7 and all(m.kernel_size == (3, 3) for m in convs)


def test_pool_pad_shortcut_by_hand() -> None:
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    out = pool_pad_shortcut(x, 5, 2)
    assert out.shape == (2, 5, 2, 2)
    # Top-left 2×2 window of sample 0, channel 0: values 0, 1, 4, 5 → mean 2.5.
    assert out[0, 0, 0, 0].item() == 2.5
    # Window (i, j) of channel c, sample n holds base + {0, 1, 4, 5} with
    # base = 48n + 16c + 8i + 2j, so its mean is base + 2.5.
    for n in range(2):
        for c in range(3):
            for i in range(2):
                for j in range(2):
                    assert out[n, c, i, j].item() == 48 * n + 16 * c + 8 * i + 2 * j + 2.5
    assert torch.count_nonzero(out[:, 3:]) == 0  # appended channels are zeros
    # Stride 1: only zero padding.
    same = pool_pad_shortcut(x, 4, 1)
    assert torch.equal(same[:, :3], x) and torch.count_nonzero(same[:, 3]) == 0
    # Unchanged channel count: identity (the reference pools only when channels change).
    assert pool_pad_shortcut(x, 3, 2) is x
    # Odd side 5 with stride 2 → 3, like the strided conv; the border window averages what exists.
    odd = torch.arange(25, dtype=torch.float32).reshape(1, 1, 5, 5)
    o = pool_pad_shortcut(odd, 2, 2)
    assert o.shape == (1, 2, 3, 3)
    assert o[0, 0, 0, 0].item() == (0 + 1 + 5 + 6) / 4
    assert o[0, 0, 0, 2].item() == (4 + 9) / 2
    assert o[0, 0, 2, 2].item() == 24
    with pytest.raises(ValueError, match="cannot shrink"):
        pool_pad_shortcut(x, 2, 1)


def test_wrn_block_shortcut_semantics() -> None:
    # With conv2 zeroed, a block outputs exactly its shortcut. The first block of the network
    # takes the shortcut after its BN-ReLU (reference activate_before_residual); the others take
    # the raw input.
    torch.manual_seed(0)
    model = create_model("wrn_debug", num_classes=10).eval()
    for block in (model.groups[0][0], model.groups[1][0]):
        nn.init.zeros_(block.conv2.weight)
        # Non-trivial running statistics, so BN-ReLU is not the identity.
        block.bn1.running_mean.uniform_(-1, 1)
        block.bn1.running_var.uniform_(0.5, 2)
    with torch.no_grad():
        x0 = torch.randn(2, 16, 8, 8)
        b0 = model.groups[0][0]
        activated = F.relu(b0.bn1(x0))
        expected0 = torch.cat([activated, torch.zeros(2, 32 - 16, 8, 8)], 1)
        torch.testing.assert_close(b0(x0), expected0)
        x1 = torch.randn(2, 32, 8, 8)
        b1 = model.groups[1][0]
        pooled = x1.reshape(2, 32, 4, 2, 4, 2).mean(dim=(3, 5))
        expected1 = torch.cat([pooled, torch.zeros(2, 64 - 32, 4, 4)], 1)
        torch.testing.assert_close(b1(x1), expected1)


# --------------------------------------------------------------------------- demo
def test_demo_cnn_cost_and_shape() -> None:
    model = create_model("demo_cnn", num_classes=10, image_size=28)
    x = torch.randn(1, 3, 28, 28)
    with FlopCounterMode(display=False) as counter:
        model.eval()(x)
    macs = counter.get_total_flops() // 2  # the counter reports 2 FLOPs per multiply-add
    # conv 28²·16·27 + 14²·32·144 + 7²·64·288, Linear 3136·128 + 128·10.
    assert macs == 28 * 28 * 16 * 27 + 14 * 14 * 32 * 144 + 7 * 7 * 64 * 288 + 3136 * 128 + 128 * 10 == 2_547_712
    assert macs <= 3_000_000
    # convs 432 + 4,608 + 18,432; BNs 2·(16 + 32 + 64 + 128); Linear 3136·128 (no bias, BN follows)
    # + 128·10 + 10.
    assert n_params(model) == 432 + 4_608 + 18_432 + 2 * (16 + 32 + 64 + 128) + 401_408 + 1_290 == 426_650
    # 1-channel input and 32 px inputs also work (the adaptive pool fixes the head size).
    gray = create_model("demo_cnn", num_classes=10, in_channels=1)
    assert gray.train()(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert model.train()(torch.randn(2, 3, 32, 32)).shape == (2, 10)


# --------------------------------------------------------------------------- VGG
def vgg_param_count(blocks: tuple[int, ...], bn: bool, num_classes: int, image_size: int) -> int:
    """VGG (``vgg.py``) by hand: 3×3 convs with bias (+ BN γ, β), widths 64·2^i capped at 512; flatten of the
    ⌊image_size/32⌋² × 512 map → 4096 → 4096 → K, all Linear with bias."""
    total, channels = 0, 3
    for i, depth in enumerate(blocks):
        width = min(64 * 2**i, 512)
        for _ in range(depth):
            total += 9 * channels * width + width + (2 * width if bn else 0)
            channels = width
    features = channels * (image_size // 32) ** 2
    return total + features * 4096 + 4096 + 4096 * 4096 + 4096 + 4096 * num_classes + num_classes


@pytest.mark.parametrize(
    "name, blocks, bn, expected",
    [
        ("vgg16", (2, 2, 3, 3, 3), False, 138_357_544),
        ("vgg16_bn", (2, 2, 3, 3, 3), True, 138_365_992),  # published 138.4 M
        ("vgg19", (2, 2, 4, 4, 4), False, 143_667_240),
        ("vgg19_bn", (2, 2, 4, 4, 4), True, 143_678_248),
    ],
)
def test_vgg_imagenet_matches_torchvision(name: str, blocks: tuple[int, ...], bn: bool, expected: int) -> None:
    # torchvision has the same convs (with bias), BNs and 25,088 → 4096 → 4096 → 1000 head; its 7×7
    # adaptive pool has no parameters, so the counts agree exactly.
    assert count(name, num_classes=1000, image_size=224) == expected == tv_count(name)
    assert vgg_param_count(blocks, bn, 1000, 224) == expected


def test_vgg_cifar_head_count_and_structure() -> None:
    # At 32 px the final map is 1×1×512: the first Linear has 512 inputs instead of 25,088, and the
    # classifier 10 outputs: 138,365,992 − (25,088 − 512)·4096 − 990·4096 − 990 = 33,646,666.
    expected = 138_365_992 - (25_088 - 512) * 4096 - 990 * 4096 - 990
    assert expected == 33_646_666 == vgg_param_count((2, 2, 3, 3, 3), True, 10, 32)
    with torch.device("meta"):
        model = create_model("vgg16_bn", num_classes=10)
        plain = create_model("vgg19", num_classes=10)
    assert n_params(model) == expected
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 13 and all(c.bias is not None and c.kernel_size == (3, 3) for c in convs)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 13
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 5
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert len(dropouts) == 2 and all(d.p == 0.5 for d in dropouts)
    assert [m.in_features for m in model.modules() if isinstance(m, nn.Linear)] == [512, 4096, 4096]
    assert sum(isinstance(m, nn.Conv2d) for m in plain.modules()) == 16
    assert not any(isinstance(m, nn.BatchNorm2d) for m in plain.modules())


def test_vgg_sizes_and_errors() -> None:
    model = create_model("vgg_debug", num_classes=3, image_size=64)
    assert model.classifier[0].in_features == 64 * 2 * 2  # 64 px → 2×2 final map, width 64
    assert model.train()(torch.randn(2, 3, 64, 64)).shape == (2, 3)
    with pytest.raises(ValueError, match=r"built for a 2×2 final feature map \(image_size 64\)"):
        model(torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match="image_size >= 32"):
        create_model("vgg16", num_classes=10, image_size=16)
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        create_model("vgg16", num_classes=10, dropout=1.0)


def test_vgg_init_and_dropout() -> None:
    torch.manual_seed(0)
    model = create_model("vgg_debug", num_classes=10)
    # Every Linear, hidden ones included, U(−1/√out, 1/√out) with bias 0 (reference dense init).
    for linear in (m for m in model.modules() if isinstance(m, nn.Linear)):
        bound = 1 / math.sqrt(linear.out_features)
        assert 0.9 * bound < linear.weight.abs().max().item() <= bound
        assert torch.count_nonzero(linear.bias) == 0
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(torch.count_nonzero(c.bias) == 0 for c in convs)
    x = torch.randn(4, 3, 32, 32)
    assert not torch.allclose(model.train()(x), model(x))  # dropout masks differ
    model.eval()
    assert torch.equal(model(x), model(x))


# --------------------------------------------------------------------------- Shake-Shake
def shakeshake_param_count(blocks_per_group: int, width: int, num_classes: int) -> int:
    """WRN Shake-Shake (``shakeshake.py``) by hand: stem conv 3·16·9 + BN; per block two branches of conv3×3 + BN +
    conv3×3 + BN; when the shape changes, two 1×1 convs to w/2 + BN(w); classifier."""
    total, channels = 3 * 16 * 9 + 2 * 16, 16
    for w, stride in ((width, 1), (2 * width, 2), (4 * width, 2)):
        for i in range(blocks_per_group):
            total += 2 * (9 * channels * w + 2 * w + 9 * w * w + 2 * w)
            if channels != w or (stride if i == 0 else 1) != 1:
                total += 2 * channels * (w // 2) + 2 * w
            channels = w
    return total + channels * num_classes + num_classes


def test_shakeshake_count_and_flags() -> None:
    # Gastaldi 2017 reports 26.2 M parameters for 26 2×96d on CIFAR-10.
    expected = shakeshake_param_count(4, 96, 10)
    assert expected == 26_192_922
    assert abs(expected / 26.2e6 - 1) < 0.001
    with torch.device("meta"):
        model = create_model("wrn26_2x96_shakeshake", num_classes=10)
    assert n_params(model) == expected
    flagged = [m for m in model.modules() if hasattr(m, "true_gradient")]
    assert len(flagged) == 12 and all(type(m).__name__ == "ShakeShakeBlock" for m in flagged)
    assert all(m.true_gradient is False for m in flagged)
    # Stem conv + BN, no ReLU; projections exactly on the three group entries (16→96, 96→192, 192→384).
    assert isinstance(model.stem[1], nn.BatchNorm2d) and len(model.stem) == 2
    projections = [m for m in model.modules() if isinstance(m, ShiftedProjection)]
    assert [(p.conv_a.in_channels, p.conv_a.out_channels, p.stride) for p in projections] == [
        (16, 48, 1),
        (96, 96, 2),
        (192, 192, 2),
    ]


def test_shifted_projection_by_hand() -> None:
    # 1×1 convs that copy channel c to output c (path a) and c + 2 (path b); BN in eval mode with
    # running stats (0, 1) divides by √(1 + eps). Path b sees x shifted by one pixel up-left.
    proj = ShiftedProjection(2, 4, 2).eval()
    with torch.no_grad():
        proj.conv_a.weight.copy_(torch.eye(2).view(2, 2, 1, 1))
        proj.conv_b.weight.copy_(torch.eye(2).view(2, 2, 1, 1))
    x = torch.arange(2 * 2 * 4 * 4, dtype=torch.float32).reshape(2, 2, 4, 4)
    scale = 1 / math.sqrt(1 + 1e-5)
    with torch.no_grad():
        out = proj(x)
        assert out.shape == (2, 4, 2, 2)
        torch.testing.assert_close(out[:, :2], x[:, :, 0::2, 0::2] * scale)  # pixels (0,0),(0,2),(2,0),(2,2)
        torch.testing.assert_close(out[:, 2:], x[:, :, 1::2, 1::2] * scale)  # the complementary (1,1),...
        proj.stride = 1
        out1 = proj(x)
    assert out1.shape == (2, 4, 4, 4)
    torch.testing.assert_close(out1[:, 2:, :3, :3], x[:, :, 1:, 1:] * scale)
    assert torch.count_nonzero(out1[:, 2:, 3, :]) == 0 and torch.count_nonzero(out1[:, 2:, :, 3]) == 0


def _capture(modules: dict[str, nn.Module]) -> dict[str, Tensor]:
    """Forward hooks that keep each module's latest output (with retain_grad) under its key."""
    store: dict[str, Tensor] = {}
    for key, module in modules.items():

        def hook(mod: nn.Module, args: object, out: Tensor, key: str = key) -> None:
            if out.requires_grad:
                out.retain_grad()
            store[key] = out

        module.register_forward_hook(hook)
    return store


def _per_sample_coef(target: Tensor, basis: Tensor) -> Tensor:
    """Least-squares c (one per sample) with target ≈ c·basis, shaped (N, 1, 1, 1)."""
    dims = tuple(range(1, target.dim()))
    c = (target * basis).sum(dims) / (basis * basis).sum(dims)
    return c.view(-1, *([1] * len(dims)))


def test_shakeshake_block_gates() -> None:
    torch.manual_seed(0)
    block = ShakeShakeBlock(8, 8, 1)  # identity shortcut: y = x + mix(a, b)
    store = _capture({"a": block.branch_a, "b": block.branch_b})
    x = torch.randn(6, 8, 5, 5)
    # Eval: the expected forward 0.5·(a + b), no randomness.
    block.eval()
    with torch.no_grad():
        y = block(x)
    torch.testing.assert_close(y, x + 0.5 * (store["a"] + store["b"]))
    block.train()
    w = torch.randn(6, 8, 5, 5)

    def run(true_gradient: bool) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
        """Forward + backward of sum(w·y); returns the forward gate g, ∂/∂a, ∂/∂b, param grads."""
        block.true_gradient = true_gradient
        block.zero_grad()
        y = block(x)
        a, b = store["a"], store["b"]
        g = _per_sample_coef((y - x - b).detach(), (a - b).detach())
        # the forward really is g·a + (1 − g)·b with one gate per sample in [0, 1]
        torch.testing.assert_close(y - x, g * a + (1 - g) * b)
        assert ((g >= 0) & (g <= 1)).all() and g.std() > 0.05
        (y * w).sum().backward()
        return g, a.grad, b.grad, [p.grad.clone() for p in block.parameters()]

    g, grad_a, grad_b, grads = run(true_gradient=True)
    # True gradient: ∂y/∂a = g, ∂y/∂b = 1 − g — the plain gradient of the gated forward.
    torch.testing.assert_close(grad_a, w * g)
    torch.testing.assert_close(grad_b, w * (1 - g))
    # The same at the parameters: rebuild the block's output with the gates fixed by hand.
    block.zero_grad()
    h = F.relu(x)
    (((x + g * block.branch_a(h) + (1 - g) * block.branch_b(h)) * w).sum()).backward()
    for got, want in zip(grads, (p.grad for p in block.parameters())):
        torch.testing.assert_close(got, want)
    # Default: an independent backward gate h ~ U(0, 1) per sample, so the gradient differs.
    g2, grad_a2, grad_b2, grads2 = run(true_gradient=False)
    gate_back = _per_sample_coef(grad_a2, w)
    torch.testing.assert_close(grad_a2, w * gate_back)
    torch.testing.assert_close(grad_b2, w * (1 - gate_back))
    assert ((gate_back >= 0) & (gate_back <= 1)).all()
    assert (gate_back - g2).abs().max() > 0.05
    assert not torch.allclose(grad_a2, w * g2)
    # The flag does not change what is drawn: the same seed gives the same forward either way
    # (GNP's pass 1 runs with true_gradient=True, pass 2 without, after restoring the RNG).
    outs = []
    for flag in (True, False):
        block.true_gradient = flag
        torch.manual_seed(123)
        outs.append(block(x).detach())
    assert torch.equal(outs[0], outs[1])


# --------------------------------------------------------------------------- PyramidNet / ShakeDrop
def pyramidnet_param_count(
    depth: int, alpha: int, num_classes: int, stem_bn: bool = False, rounding: str = "floor"
) -> int:
    """PyramidNet (``pyramidnet.py``) by hand, in integers: L = 3·(depth − 2)/9 blocks, width of block k
    ⌊(16·L + k·α)/L⌋ (or rounded half up); block BN(c_in) + conv1×1 + BN + conv3×3 + BN +
    conv1×1(4w) + BN(4w); stem conv (+ BN); final BN; classifier. Shortcuts have no parameters."""
    blocks = 3 * ((depth - 2) // 9)
    total, channels = 3 * 16 * 9 + (2 * 16 if stem_bn else 0), 16
    for k in range(1, blocks + 1):
        num = 16 * blocks + k * alpha
        w = num // blocks if rounding == "floor" else (2 * num + blocks) // (2 * blocks)
        total += 2 * channels + channels * w + 2 * w + 9 * w * w + 2 * w + 4 * w * w + 8 * w
        channels = 4 * w
    return total + 2 * channels + channels * num_classes + num_classes


@pytest.mark.parametrize(
    "name, depth, alpha, published, floor_count, round_count",
    [
        ("pyramidnet164_48", 164, 48, 1.7e6, 1_683_970, 1_715_410),
        ("pyramidnet164_270", 164, 270, 27.0e6, 27_215_989, 27_215_989),
        ("pyramidnet200_240", 200, 240, 26.6e6, 26_616_968, 26_752_670),
        ("pyramidnet272_200", 272, 200, 26.0e6, 26_049_530, 26_210_810),
    ],
)
def test_pyramidnet_counts(
    name: str, depth: int, alpha: int, published: float, floor_count: int, round_count: int
) -> None:
    # CIFAR-10 (10 classes). Default widths ⌊16 + kα/L⌋ (paper); rounding="round" is the GNP
    # reference's int(round(·)). The paper's published counts are within 1 % of the floor rule
    # (α = 270: 0.8 % above the published 27.0 M with either rule, its widths are integers).
    assert pyramidnet_param_count(depth, alpha, 10) == floor_count
    assert pyramidnet_param_count(depth, alpha, 10, rounding="round") == round_count
    assert count(name, num_classes=10) == floor_count
    assert count(name, num_classes=10, rounding="round") == round_count
    assert abs(floor_count / published - 1) < 0.01


def test_pyramidnet_shakedrop_counts_and_keep_probs() -> None:
    # ShakeDrop variants = plain + stem BN (32 parameters).
    with torch.device("meta"):
        model = create_model("pyramidnet272_200_shakedrop", num_classes=10)
        plain = create_model("pyramidnet272_200", num_classes=10)
    assert n_params(model) == 26_049_530 + 32 == pyramidnet_param_count(272, 200, 10, stem_bn=True)
    assert count("pyramidnet164_48_shakedrop", num_classes=100) == pyramidnet_param_count(164, 48, 100, stem_bn=True)
    blocks = list(model.blocks)
    assert len(blocks) == 90 and all(isinstance(b, ShakeDropBlock) for b in blocks)
    # p_l = 1 − (l/L)·0.5 for l = 1..L: 1 − 1/180 first, 0.5 last.
    for depth, block in enumerate(blocks, start=1):
        assert block.keep_prob == pytest.approx(1 - depth / 90 * 0.5, abs=1e-12)
    assert blocks[-1].keep_prob == pytest.approx(0.5)
    assert all(b.true_gradient is False for b in blocks)
    assert [m for m in model.modules() if hasattr(m, "true_gradient")] == blocks
    assert not any(hasattr(m, "true_gradient") for m in plain.modules())
    # Stem: conv only (plain) vs conv + BN (ShakeDrop); strides 2 at the entries of groups 2 and 3.
    assert len(plain.stem) == 1 and isinstance(model.stem[1], nn.BatchNorm2d)
    assert [k for k, b in enumerate(blocks, start=1) if b.stride == 2] == [31, 61]
    # widths ⌊16 + 20k/9⌋ = 18, 20, 22, …, 216 → 4× outputs
    assert [b.out_channels for b in blocks][:3] == [72, 80, 88] and blocks[-1].out_channels == 864
    with pytest.raises(ValueError, match=r"final_drop must be in \[0, 1\]"):
        create_model("pyramidnet_debug", num_classes=10, final_drop=1.5)
    with pytest.raises(ValueError, match="rounding must be one of floor, round"):
        create_model("pyramidnet164_48", num_classes=10, rounding="ceil")


def test_pyramid_widths() -> None:
    # α = 48, L = 54: 16 + k·8/9 → 16 (k=1, 16.9), 24 exactly at k = 9, 64 = 16 + α at the end.
    widths = pyramid_widths(164, 48)
    assert len(widths) == 54 and widths[0] == 16 and widths[8] == 24 and widths[-1] == 64
    assert pyramid_widths(164, 48, "round")[0] == 17
    assert pyramid_widths(164, 270) == [16 + 5 * k for k in range(1, 55)]
    assert pyramid_widths(272, 200)[-1] == 216 and pyramid_widths(200, 240)[-1] == 256
    with pytest.raises(ValueError, match="depth must be 9n\\+2"):
        pyramid_widths(100, 48)


def test_pyramid_pool_pad_and_block_shapes() -> None:
    x = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(1, 2, 4, 4)
    out = pool_pad(x, 5, 2)
    assert out.shape == (1, 5, 2, 2)
    # window (i, j) of channel c holds 16c + 8i + 2j + {0, 1, 4, 5} → mean 16c + 8i + 2j + 2.5
    for c in range(2):
        for i in range(2):
            for j in range(2):
                assert out[0, c, i, j].item() == 16 * c + 8 * i + 2 * j + 2.5
    assert torch.count_nonzero(out[:, 2:]) == 0
    # Unlike WRN's shortcut it pools whenever the block strides, even with unchanged channels.
    assert pool_pad(x, 2, 2).shape == (1, 2, 2, 2)
    assert pool_pad(x, 2, 1) is x
    block = PyramidBottleneck(16, 5, 2)
    assert block(torch.randn(2, 16, 8, 8)).shape == (2, 20, 4, 4)
    # BN first (no ReLU before the first conv), BN last (no ReLU before the addition).
    assert isinstance(block.residual[0], nn.BatchNorm2d) and isinstance(block.residual[1], nn.Conv2d)
    assert isinstance(block.residual[-1], nn.BatchNorm2d)


def test_shake_drop_coefficients() -> None:
    # Per-sample coefficients on x = 1: the output is the forward coefficient, x.grad the backward one.
    torch.manual_seed(0)
    n, p = 20_000, 0.7
    x = torch.ones(n, 1, requires_grad=True)
    y = shake_drop(x, p, training=True)
    y.sum().backward()
    fwd, bwd = y.detach().squeeze(1), x.grad.squeeze(1)
    kept = fwd == 1  # α = 1 exactly has probability 0
    assert abs(kept.float().mean().item() - p) < 0.015  # Bernoulli(p): σ = 0.0032
    alpha = fwd[~kept]
    assert alpha.min() >= -1 and alpha.max() <= 1 and abs(alpha.mean().item()) < 0.03
    assert alpha.min() < -0.99 and alpha.max() > 0.99
    assert torch.equal(bwd[kept], torch.ones_like(bwd[kept]))
    beta = bwd[~kept]
    assert beta.min() >= 0 and beta.max() <= 1 and abs(beta.mean().item() - 0.5) < 0.02
    assert abs(torch.corrcoef(torch.stack([alpha, beta]))[0, 1].item()) < 0.05  # β independent of α
    # true_gradient: the backward coefficient is the forward one.
    x.grad = None
    y = shake_drop(x, p, training=True, true_gradient=True)
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())
    # Eval: scaled by the expected forward coefficient p + E[α]·(1 − p) = p.
    z = torch.randn(3, 4)
    torch.testing.assert_close(shake_drop(z, p, training=False), p * z)


def test_shakedrop_block_semantics() -> None:
    torch.manual_seed(0)
    block = ShakeDropBlock(8, 2, 1, keep_prob=0.5)  # 8 = 4·2 channels in and out: identity shortcut
    store = _capture({"r": block.residual})
    x = torch.randn(16, 8, 4, 4)
    block.eval()
    with torch.no_grad():
        torch.testing.assert_close(block(x), x + 0.5 * store["r"])
    block.train()
    w = torch.randn(16, 8, 4, 4)
    for true_gradient in (True, False):
        block.true_gradient = true_gradient
        y = block(x)
        r = store["r"]
        c_fwd = _per_sample_coef((y - x).detach(), r.detach())
        torch.testing.assert_close(y - x, c_fwd * r)
        (y * w).sum().backward()
        c_bwd = _per_sample_coef(r.grad, w)
        torch.testing.assert_close(r.grad, c_bwd * w)
        dropped = (c_fwd - 1).abs().flatten() > 1e-4
        assert 0 < dropped.sum() < 16
        if true_gradient:
            torch.testing.assert_close(c_bwd, c_fwd)
        else:
            assert torch.allclose(c_bwd.flatten()[~dropped], torch.ones(int((~dropped).sum())))
            assert ((c_bwd >= 0) & (c_bwd <= 1)).all()
            assert (c_bwd - c_fwd).flatten()[dropped].abs().max() > 0.05


# --------------------------------------------------------------------------- GNP integration
@pytest.mark.parametrize("name", ["shakeshake_debug", "pyramidnet_debug", "vit_debug"])
def test_gnp_step_sees_same_gates_and_switches_true_gradient(name: str) -> None:
    # With r so small that θ + ε == θ in float32, GNP's pass 2 repeats pass 1 exactly iff it draws
    # the same gates and dropout masks (the optimizer restores the RNG; the models must draw the
    # same amount whatever true_gradient is). Pass 1 runs with true_gradient=True, pass 2 with False.
    from trainer.optim.gnp import GNP

    torch.manual_seed(0)
    model = create_model(name, num_classes=10)
    flags: list[bool] = []
    flagged = [m for m in model.modules() if hasattr(m, "true_gradient")]
    for m in flagged:
        m.register_forward_pre_hook(lambda mod, args: flags.append(mod.true_gradient))
    x, y = torch.randn(4, 3, 32, 32), torch.arange(4)
    opt = GNP(torch.optim.SGD(model.parameters(), lr=0.0), r=1e-30, alpha=0.5)
    info = opt.train_step(lambda: F.cross_entropy(model(x), y), model=model)
    assert torch.equal(info.loss, info.loss_perturbed)
    assert flags == [True] * len(flagged) + [False] * len(flagged)
    assert all(m.true_gradient is False for m in flagged)


# --------------------------------------------------------------------------- ViT
def vit_param_count(hidden: int, mlp: int, layers: int, num_classes: int, image_size: int, patch: int) -> int:
    """ViT (``vit.py``) by hand: patch conv (+ bias), cls token, position embedding for tokens + 1; per block
    two LayerNorms, qkv (3·hidden outputs) and output projection, two MLP Linears, all with bias;
    final LayerNorm; head."""
    tokens = (image_size // patch) ** 2 + 1
    block = (
        4 * hidden
        + (3 * hidden * hidden + 3 * hidden)
        + (hidden * hidden + hidden)
        + (hidden * mlp + mlp)
        + (mlp * hidden + hidden)
    )
    embed = 3 * patch * patch * hidden + hidden + hidden + tokens * hidden
    return embed + layers * block + 2 * hidden + hidden * num_classes + num_classes


@pytest.mark.parametrize(
    "name, expected, hidden, mlp, layers, tv_name",
    [
        ("vit_ti", 5_717_416, 192, 768, 12, None),  # timm vit_tiny_patch16_224
        ("vit_s", 22_050_664, 384, 1536, 12, None),  # timm vit_small_patch16_224 (22.05 M)
        ("vit_b", 86_567_656, 768, 3072, 12, "vit_b_16"),  # 86.6 M
        ("vit_l", 304_326_632, 1024, 4096, 24, "vit_l_16"),
    ],
)
def test_vit_imagenet_counts(name: str, expected: int, hidden: int, mlp: int, layers: int, tv_name: str | None) -> None:
    # 224 px → patch 16, 196 tokens + cls; 1000 classes. Same layout as timm/torchvision, so equal.
    assert count(name, num_classes=1000, image_size=224) == expected
    assert vit_param_count(hidden, mlp, layers, 1000, 224, 16) == expected
    if tv_name is not None:
        assert tv_count(tv_name) == expected


def test_vit_cifar_count_and_patch_choice() -> None:
    # ViT-S on CIFAR-10: patch 4, 64 tokens + cls: 22,050,664 − 16²·3·384 + 4²·3·384 (patch conv)
    # − 132·384 (position embeddings 197 → 65) − 990·384 − 990 (head 1000 → 10) = 21,342,346.
    expected = 22_050_664 - (256 - 16) * 3 * 384 - 132 * 384 - 990 * 384 - 990
    assert expected == 21_342_346 == vit_param_count(384, 1536, 12, 10, 32, 4)
    assert count("vit_s", num_classes=10) == expected
    for image_size, patch, tokens in ((32, 4, 64), (127, None, None), (128, 16, 64), (224, 16, 196)):
        if patch is None:
            with pytest.raises(ValueError, match="patch 4 must divide image_size 127"):
                create_model("vit_debug", num_classes=10, image_size=image_size)
            continue
        model = create_model("vit_debug", num_classes=10, image_size=image_size)
        assert model.patch == patch and model.pos_embed.shape == (1, tokens + 1, 32)
    model = create_model("vit_debug", num_classes=10, image_size=32, patch=8)
    assert model.patch_embed.kernel_size == (8, 8) and model.patch_embed.stride == (8, 8)
    assert model.pos_embed.shape == (1, 17, 32)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match=r"built for 32×32 images"):
        model(torch.randn(2, 3, 64, 64))
    with pytest.raises(ValueError, match="patch 5 must divide image_size 32"):
        create_model("vit_s", num_classes=10, patch=5)
    assert model_options("vit_s") == {"patch": None, "dropout": 0.1, "attention_dropout": 0.1}


def test_vit_head_zero_init_and_first_gradients() -> None:
    torch.manual_seed(0)
    model = create_model("vit_debug", num_classes=10)
    assert torch.count_nonzero(model.head.weight) == 0 and torch.count_nonzero(model.head.bias) == 0
    assert torch.count_nonzero(model.cls_token) == 0
    x = torch.randn(4, 3, 32, 32)
    out = model(x)
    assert torch.count_nonzero(out) == 0  # zero head → zero logits
    F.cross_entropy(out, torch.arange(4)).backward()
    # The zero head blocks the backward: at the first step only the head gets a non-zero gradient
    # (softmax(0) − onehot for the bias), as in the reference.
    torch.testing.assert_close(
        model.head.bias.grad, torch.full((10,), 0.1) - torch.bincount(torch.arange(4), minlength=10) / 4
    )
    assert torch.count_nonzero(model.head.weight.grad) > 0
    others = [n for n, p in model.named_parameters() if not n.startswith("head") and torch.count_nonzero(p.grad)]
    assert others == []


def test_vit_init_follows_reference() -> None:
    torch.manual_seed(0)
    model = create_model("vit_s", num_classes=10)  # 32 px, patch 4
    assert model.pos_embed.std().item() == pytest.approx(0.02, rel=0.03)  # 65·384 samples
    fan_in = 3 * 4 * 4
    w = model.patch_embed.weight
    assert w.std().item() == pytest.approx(math.sqrt(1 / fan_in), rel=0.03)  # LeCun normal (truncated)
    assert w.abs().max().item() <= 2 * math.sqrt(1 / fan_in) / 0.87962566103423978 + 1e-6
    assert torch.count_nonzero(model.patch_embed.bias) == 0
    block = model.blocks[0]
    hidden = 384
    bound = math.sqrt(6 / (2 * hidden))  # Xavier on each hidden×hidden q, k, v kernel
    for part in block.attn.qkv.weight.split(hidden):
        assert 0.99 * bound < part.abs().max().item() <= bound
    assert math.sqrt(6 / (4 * hidden)) < block.attn.qkv.weight.abs().max().item()  # not Xavier on 3h×h
    assert torch.count_nonzero(block.attn.qkv.bias) == 0 and torch.count_nonzero(block.attn.proj.bias) == 0
    fc1, fc2 = block.mlp[0], block.mlp[3]
    assert fc1.weight.abs().max().item() <= math.sqrt(6 / (384 + 1536))
    assert 0 < fc1.bias.abs().max().item() < 1e-5 and 0 < fc2.bias.abs().max().item() < 1e-5  # N(0, 1e-6)
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) == 2 * 12 + 1 and all(m.eps == 1e-6 for m in norms)
    gelus = [m for m in model.modules() if isinstance(m, nn.GELU)]
    assert len(gelus) == 12 and all(m.approximate == "tanh" for m in gelus)  # Flax nn.gelu default
    assert not any(isinstance(m, nn.Tanh) for m in model.modules())  # no pre-logits layer


def test_vit_dropout_present_and_configurable() -> None:
    with torch.device("meta"):
        model = create_model("vit_s", num_classes=10)
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    # after the position embedding, after attention, and twice in each MLP
    assert len(dropouts) == 1 + 3 * 12 and all(m.p == 0.1 for m in dropouts)
    assert all(b.attn.attention_dropout == 0.1 for b in model.blocks)
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)

    def varies(**kwargs: float) -> bool:
        m = create_model("vit_debug", num_classes=10, **kwargs)
        nn.init.normal_(m.head.weight)  # a zero head would hide every difference
        m.train()
        varies_train = not torch.allclose(m(x), m(x))
        m.eval()
        assert torch.equal(m(x), m(x))
        return varies_train

    assert varies()
    assert not varies(dropout=0.0, attention_dropout=0.0)
    assert varies(dropout=0.0, attention_dropout=0.5)  # attention dropout alone
    assert varies(dropout=0.5, attention_dropout=0.0)
    with pytest.raises(ValueError, match=r"attention_dropout must be in \[0, 1\)"):
        create_model("vit_debug", num_classes=10, attention_dropout=1.0)


def test_vit_attention_matches_torch_multihead() -> None:
    # Independent reference: torch's MultiheadAttention with the same packed q/k/v and output weights.
    torch.manual_seed(0)
    attn = Attention(32, 4, attention_dropout=0.0).eval()
    mha = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    with torch.no_grad():
        nn.init.normal_(attn.qkv.bias)
        nn.init.normal_(attn.proj.bias)
        mha.in_proj_weight.copy_(attn.qkv.weight)
        mha.in_proj_bias.copy_(attn.qkv.bias)
        mha.out_proj.weight.copy_(attn.proj.weight)
        mha.out_proj.bias.copy_(attn.proj.bias)
        x = torch.randn(3, 7, 32)
        torch.testing.assert_close(attn(x), mha(x, x, x, need_weights=False)[0])
