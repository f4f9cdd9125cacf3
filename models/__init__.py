"""Backbones that accept any attention module: ``create_model(arch, attention=...)``."""

from .factory import ARCHS, backbone_options, create_model
from .mobilenet import MobileNetV1
from .resnet import BasicBlock, Bottleneck, ResNet

__all__ = ["ARCHS", "backbone_options", "BasicBlock", "Bottleneck", "MobileNetV1", "ResNet", "create_model"]
