"""Registered building blocks, stems and heads (as pycls' AnyNet), one module per family.

Each block, stem and head type is one class that holds everything about it: its name, the stage
fields it reads, its checks, how it builds itself and its analytic complexity twin
(`complexity`, counting the layers it builds without building them). `registry` defines what a
block, stem and head type is and holds the registries; importing this package imports every
family below, which registers its types.

- `registry`: `Block`, `Stem`, `Head`, `BLOCKS`, `STEMS`, `HEADS`, `check_stage`.
- `counting`: `Cx` and the twins of torch's layers (conv, BN, pooling, linear); torch-free.
- `layers`: shared layers with their twins: conv + BN, squeeze-excitation, the projection
  shortcut, a stage's pool, the channel shuffle, stochastic depth.
- `resnet`: `res_bottleneck` (RegNetX/Y, ResNet-50 v1.5, ResNeXt), `res_basic` (ResNet-18/34),
  `vanilla`.
- `mobile`: `dw_separable` (MobileNetV1), `inverted_residual` (MobileNetV2/V3, EfficientNet,
  DepthShrinker), `shufflenet_v1`, `shufflenet_v2`.
- `plain`: blocks without BatchNorm, `conv` (AlexNet) and `fire` (SqueezeNet).
- `reparam`: the train forms `archc fuse` re-parameterizes: `repvgg`, `qarepvgg`, `acb`, `dbb`,
  `mobileone`, `qamobileone`, `mobileone_unit`; and `reducenet`.
- `hybrid`: `repmixer` (FastViT), `repvit`.
- `vanillanet`: the `vanillanet` block, the deep-training activation and its schedule, the
  activation series.
- `stems_heads`: every stem type and head type.

Module naming is part of the contract (qualified names in graphs, checkpoints and reports):
`stem.conv`, `s1.b1.proj.conv`, `s1.b1.f.a.conv`, `s1.b1.f.se.reduce`, `s2.pool`, `head.fc`, ...
"""

# importing a family registers its types
from archc.frontend.blocks import (  # noqa: F401
    hybrid,
    mobile,
    plain,
    reparam,
    resnet,
    stems_heads,
    vanillanet,
)
