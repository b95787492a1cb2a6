"""ImageNet-family models built by timm (never `pretrained=True`: nothing is downloaded;
start from local weights with `init_from=`). `stem: cifar` adapts the convolutional
stems to 32x32 inputs; the transformers take their image and patch size from the config.
The papers' models: ResNet-18, MobileNetV2, MobileNetV3-Small and EfficientNet-lite0
(Nagel et al.), DeiT-T/S (OFQ; `distilled: true` gives DeiT's distillation token and
head), Swin-T (OFQ), ViT-Tiny (Wenshoj et al.)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from oscbench.models.base import MODELS
from oscbench.registry import ConfigError, check


@dataclass
class ConvNetConfig:
    stem: str  # imagenet: the timm model as is; cifar: stride-1 3x3 stem, no max-pool (32x32)

    def __post_init__(self) -> None:
        check(self.stem in ("imagenet", "cifar"), "stem", self.stem, "imagenet, cifar")


@dataclass
class MobileNetV3Config(ConvNetConfig):
    variant: str  # small (Nagel et al.'s MobileNetV3-Small) | large

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.variant in ("small", "large"), "variant", self.variant, "small, large")


@dataclass
class ViTConfig:
    img_size: int  # 224 for ImageNet, 32 for CIFAR
    patch_size: int  # 16 for ImageNet, 4 for CIFAR

    def __post_init__(self) -> None:
        check(
            self.img_size % self.patch_size == 0,
            "patch_size",
            self.patch_size,
            f"a divisor of model.img_size ({self.img_size})",
        )


@dataclass
class DeiTConfig(ViTConfig):
    distilled: bool  # DeiT's distillation token and head (distill.loss=soft+hard trains it)


@dataclass
class SwinConfig(ViTConfig):
    window_size: int  # 7 at 224 x 224 with 4 x 4 patches (timm pads or shrinks windows to fit)


@MODELS.register("resnet18", ConvNetConfig)
def resnet18(cfg: ConvNetConfig, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    import timm

    model = timm.create_model("resnet18", num_classes=num_classes, in_chans=in_channels)
    if cfg.stem == "cifar":
        model.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    return model


def _efficient(arch: str, cfg: ConvNetConfig, num_classes: int, in_channels: int) -> nn.Module:
    """timm's EfficientNet-family nets (MobileNetV2/V3, EfficientNet-lite): `stem: cifar`
    makes the stem's stride 1 for 32x32 inputs."""
    import timm

    model = timm.create_model(arch, num_classes=num_classes, in_chans=in_channels)
    if cfg.stem == "cifar":
        model.conv_stem.stride = (1, 1)
    return model


@MODELS.register("mobilenetv2", ConvNetConfig)
def mobilenetv2(
    cfg: ConvNetConfig, num_classes: int, in_channels: int, image_size: int
) -> nn.Module:
    return _efficient("mobilenetv2_100", cfg, num_classes, in_channels)


@MODELS.register("mobilenetv3", MobileNetV3Config)
def mobilenetv3(
    cfg: MobileNetV3Config, num_classes: int, in_channels: int, image_size: int
) -> nn.Module:
    return _efficient(f"mobilenetv3_{cfg.variant}_100", cfg, num_classes, in_channels)


@MODELS.register("efficientnet_lite0", ConvNetConfig)
def efficientnet_lite0(
    cfg: ConvNetConfig, num_classes: int, in_channels: int, image_size: int
) -> nn.Module:
    return _efficient("efficientnet_lite0", cfg, num_classes, in_channels)


def _transformer(
    arch: str, cfg: ViTConfig, num_classes: int, in_channels: int, image_size: int, **kw
) -> nn.Module:
    import timm

    if cfg.img_size != image_size:
        raise ConfigError(
            f"model.img_size={cfg.img_size}, but the dataset's images are {image_size}x"
            f"{image_size}; set model.img_size={image_size} and a model.patch_size that "
            f"divides it (e.g. model.patch_size={_patch_for(image_size)})"
        )
    return timm.create_model(
        arch,
        num_classes=num_classes,
        in_chans=in_channels,
        img_size=cfg.img_size,
        patch_size=cfg.patch_size,
        **kw,
    )


def _deit(size: str, cfg: DeiTConfig, *args: int) -> nn.Module:
    arch = f"deit_{size}_distilled_patch16_224" if cfg.distilled else f"deit_{size}_patch16_224"
    return _transformer(arch, cfg, *args)


@MODELS.register("deit_tiny", DeiTConfig)
def deit_tiny(cfg: DeiTConfig, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return _deit("tiny", cfg, num_classes, in_channels, image_size)


@MODELS.register("deit_small", DeiTConfig)
def deit_small(cfg: DeiTConfig, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return _deit("small", cfg, num_classes, in_channels, image_size)


@MODELS.register("vit_tiny", ViTConfig)
def vit_tiny(cfg: ViTConfig, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return _transformer("vit_tiny_patch16_224", cfg, num_classes, in_channels, image_size)


@MODELS.register("swin_tiny", SwinConfig)
def swin_tiny(cfg: SwinConfig, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return _transformer(
        "swin_tiny_patch4_window7_224",
        cfg,
        num_classes,
        in_channels,
        image_size,
        window_size=cfg.window_size,
    )


def _patch_for(image_size: int) -> int:
    """A patch size that divides the image into at least 4 x 4 patches."""
    return max(
        (p for p in (16, 8, 4, 2, 1) if image_size % p == 0 and image_size // p >= 4), default=1
    )


@dataclass
class SmallMobileNetV2Config:
    width: int  # the first stage's channels; then 1.5x, 2x and 3x (MobileNetV2's ratios)
    expansion: int  # the inverted residuals' expansion (MobileNetV2: 6)
    features: int  # channels of the last 1x1 conv (MobileNetV2: 1280)

    def __post_init__(self) -> None:
        for key in ("width", "expansion", "features"):
            check(getattr(self, key) >= 1, key, getattr(self, key), "a positive integer")


@MODELS.register("mobilenetv2_small", SmallMobileNetV2Config)
def mobilenetv2_small(
    cfg: SmallMobileNetV2Config, num_classes: int, in_channels: int, image_size: int
) -> nn.Module:
    """MobileNetV2's blocks (a depthwise-separable block, then inverted residuals: 1x1
    expansion, depthwise 3x3, linear 1x1 projection, ReLU6) sized for 16-32 pixel inputs,
    built by timm's EfficientNet builder: a stride-1 stem and four stages, two of stride 2,
    with the channels exactly as given (no rounding to multiples of 8)."""
    from timm.models._efficientnet_builder import decode_arch_def
    from timm.models.efficientnet import EfficientNet

    w, e = cfg.width, cfg.expansion
    arch = [
        [f"ds_r1_k3_s1_c{w}"],
        [f"ir_r2_k3_s2_e{e}_c{round(1.5 * w)}"],
        [f"ir_r2_k3_s2_e{e}_c{2 * w}"],
        [f"ir_r2_k3_s1_e{e}_c{3 * w}"],
    ]
    model = EfficientNet(
        decode_arch_def(arch),
        num_classes=num_classes,
        num_features=cfg.features,
        in_chans=in_channels,
        stem_size=w,
        act_layer=nn.ReLU6,
        round_chs_fn=lambda channels: channels,
    )
    model.conv_stem.stride = (1, 1)
    return model
