"""Model registry: `model.name` in conf/model/*.yaml -> a builder. A model plugin is one
module with a builder

    @MODELS.register("cnn_small", CnnSmallConfig)
    def cnn_small(cfg, num_classes: int, in_channels: int, image_size: int) -> nn.Module
"""

from __future__ import annotations

from torch import nn

from oscbench.registry import Registry

MODELS: Registry[nn.Module] = Registry("model")


def build_model(component, num_classes: int, in_channels: int, image_size: int) -> nn.Module:  # noqa: ANN001
    """Build a validated model `Component` for a dataset's classes, input channels and
    image size (height = width)."""
    return MODELS.get(component.name).build(
        component.options, num_classes=num_classes, in_channels=in_channels, image_size=image_size
    )
