"""CIFAR-style and ImageNet (torchvision layout) ResNets, FitNets hint regressors, and the conv layer they
are built with (docs/models.md).

    conv.py     CONV_BACKWARDS: "xla" -> nn.Conv, "materialized" -> the CPU conv with a materialized backward,
                "onednn" -> oneDNN's conv and its gradients on the CPU (debkd_jax.native)
    norm.py     BatchNorm, and its CPU variant (channel sums as GEMVs) that "onednn" builds models with
    resnet.py   BasicBlock, Bottleneck, ResNet (CIFAR or ImageNet stem), the presets (MODELS), get_model,
                feature_taps, count_params
    hints.py    HintRegressor
    external.py any Flax module as a model: "package.module:factory" (Adapted, load_factory)
"""

from debkd_jax.models.conv import (
    CONV_BACKWARD_SETTINGS,
    CONV_BACKWARDS,
    MaterializedConv,
    ModuleDef,
    OnednnConv,
    conv_backward_of,
    conv_for,
    conv_general_dilated_materialized,
    conv_general_dilated_onednn,
    fusion_barrier,
    onednn_conv,
    onednn_unsupported,
)
from debkd_jax.models.external import Adapted, check_features_for_hints, is_factory_spec, load_factory
from debkd_jax.models.hints import HintRegressor
from debkd_jax.models.norm import (
    NORMS,
    BatchNorm,
    CpuBatchNorm,
    DotSumBatchNorm,
    batch_norm_train,
    channel_sums,
    norm_for,
)
from debkd_jax.models.resnet import (
    MODELS,
    BasicBlock,
    Bottleneck,
    ResNet,
    conv1x1,
    conv3x3,
    conv_init,
    count_params,
    feature_taps,
    get_model,
    imagenet_resnet18,
    imagenet_resnet34,
    imagenet_resnet50,
    imagenet_resnet_tiny,
    resnet8,
    resnet8x4,
    resnet18,
    resnet50,
    resnet_tiny,
)

__all__ = [
    "Adapted",
    "check_features_for_hints",
    "is_factory_spec",
    "load_factory",
    "CONV_BACKWARDS",
    "CONV_BACKWARD_SETTINGS",
    "MODELS",
    "NORMS",
    "CpuBatchNorm",
    "DotSumBatchNorm",
    "batch_norm_train",
    "channel_sums",
    "norm_for",
    "BasicBlock",
    "BatchNorm",
    "Bottleneck",
    "HintRegressor",
    "MaterializedConv",
    "ModuleDef",
    "OnednnConv",
    "ResNet",
    "conv1x1",
    "conv3x3",
    "conv_backward_of",
    "conv_for",
    "conv_general_dilated_materialized",
    "conv_general_dilated_onednn",
    "conv_init",
    "count_params",
    "feature_taps",
    "fusion_barrier",
    "get_model",
    "imagenet_resnet18",
    "imagenet_resnet34",
    "imagenet_resnet50",
    "imagenet_resnet_tiny",
    "onednn_conv",
    "onednn_unsupported",
    "resnet8",
    "resnet8x4",
    "resnet18",
    "resnet50",
    "resnet_tiny",
]
