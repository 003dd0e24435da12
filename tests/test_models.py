"""Model registry and zoo: every registered model builds, runs forward and backward with a finite
gradient for every parameter, and the paper variants have the published parameter counts.

Expected values come from torchvision (ResNet-18/34/50/101/152 layouts), published figures
(WRN-28-10 36.48 M with 1×1 shortcuts), hand arithmetic of the architecture tables in
gnp-method.md §6 (written out below), and hand computations on small tensors.
"""

from __future__ import annotations

import math
import time

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from trainer.models import create_model, list_models, model_options, register_model
from trainer.models import registry
from trainer.models.wideresnet import pool_pad_shortcut

PAPER_NAMES = {
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnet200",
    "wrn16_4", "wrn28_10", "wrn40_10",
}
DEBUG_NAMES = {"resnet_debug", "wrn_debug"}
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
    """Parameters of the §6 ResNet layout, by hand: stem conv (no bias) + BN; per block its convs
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
    assert DEBUG_NAMES <= set(list_models("*_debug"))
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


# --------------------------------------------------------------------------- every model
# (batch, side) for the forward/backward test. The paper variants run at 8 px and batch 2 (CIFAR
# stem, built with image_size=32) so that even ResNet-200 takes about a second on 2 cores; after
# three stride-2 stages the last feature map is 1×1, and 2 images still give train-mode BN two
# values per channel.
SMALL_INPUT: dict[str, tuple[int, int]] = {"demo_cnn": (4, 28), "resnet_debug": (4, 32), "wrn_debug": (4, 32)}


@pytest.mark.parametrize("name", list_models())
def test_forward_backward_every_param_has_grad(name: str) -> None:
    torch.manual_seed(0)
    batch, side = SMALL_INPUT.get(name, (2, 8))
    num_classes = 7  # not 10/100/1000, so nothing can hide behind a class-count rule
    model = create_model(name, num_classes=num_classes, image_size=32)
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
    for name in ("resnet_debug", "wrn_debug", "demo_cnn"):
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
