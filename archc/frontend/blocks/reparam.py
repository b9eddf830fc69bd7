"""Train-form (over-parameterized) blocks: several linear branches that `archc fuse` collapses
into one conv per block (structural re-parameterization, R1-R9 of docs/rewrites.md), and
ReduceNet, whose train phase has a branch the reduced phase drops; each with its analytic twin.

`repvgg`, `qarepvgg`, `acb`, `dbb`, `mobileone`, `qamobileone`, `mobileone_unit` (each class states
its math; the `qa` variants place the BNs as QARepVGG, for int8), and `reducenet`:
`c(branch1(x) + branch2(x)) + proj(x)` (train phase) or `c(branch2(x)) + proj(x)` (reduced
phase, branch1 not built), branch1 = 3x3 stride s w_in->e act, 1x1 e->w_out act with
e = round(expansion * w_out); branch2 = 3x3 stride s act; c = 3x3 (no activation); proj = 1x1
conv stride s + BN, present only when w_in != w_out or s != 1.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn

from archc.frontend.blocks.counting import Cx, branch_cx, conv2d_cx, norm2d_cx, pool2d_cx
from archc.frontend.blocks.layers import (
    ACTIVATIONS,
    SqueezeExcitation,
    conv_bn,
    conv_bn_cx,
    projection,
    projection_cx,
    squeeze_excitation,
    squeeze_excitation_cx,
)
from archc.frontend.blocks.registry import SE_FIELDS, Block, register_block
from archc.frontend.spec import StageSpec


class TrainFormBlock(Block):
    """`act(sum of branches(x))`: every branch is linear in x; checks the input width's groups."""

    uses = frozenset({"group_width"})

    @classmethod
    def check(cls, stage, w_in):
        if stage.group_width is not None and stage.width % stage.group_width:
            return "group_width", (
                f"width {stage.width} is not divisible by group_width {stage.group_width}"
            )
        groups = stage.train_form_groups(w_in)
        if stage.width % groups:
            return "width", (
                f"width {stage.width} is not divisible by the {groups} groups of the input "
                f"width {w_in} at group_width {stage.group_width}"
            )
        return None

    def branch_outputs(self, x: Tensor) -> list[Tensor]:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        outputs = self.branch_outputs(x)
        total = outputs[0]
        for output in outputs[1:]:
            total = total + output
        return self.act(total)


@register_block
class RepVGG(TrainFormBlock):
    """RepVGG (Ding et al. 2021): relu(BN(3x3 x) + BN(1x1 x) + BN(x)), the identity branch only
    when w_in == w_out and stride 1. Deploy form: one 3x3 conv with bias."""

    name = "repvgg"

    @staticmethod
    def complexity(cx: Cx, w_in: int, w_out: int, stride: int, stage: StageSpec) -> Cx:
        groups = stage.train_form_groups(w_in)
        branch_cx(cx, lambda side: conv_bn_cx(side, w_in, w_out, 1, stride, groups))
        if w_in == w_out and stride == 1:
            norm2d_cx(cx, w_out)
        return conv_bn_cx(cx, w_in, w_out, 3, stride, groups)

    def __init__(self, w_in: int, w_out: int, stride: int, stage: StageSpec):
        super().__init__()
        groups = stage.train_form_groups(w_in)
        self.conv3x3 = conv_bn(w_in, w_out, 3, stride, groups, act=None)
        self.conv1x1 = conv_bn(w_in, w_out, 1, stride, groups, act=None)
        self.identity = nn.BatchNorm2d(w_out) if w_in == w_out and stride == 1 else None
        self.act = nn.ReLU()

    def branch_outputs(self, x):
        outputs = [self.conv3x3(x), self.conv1x1(x)]
        if self.identity is not None:
            outputs.append(self.identity(x))
        return outputs


@register_block
class QARepVGG(TrainFormBlock):
    """QARepVGG (Chu et al. 2023, "Make RepVGG Greater Again: A Quantization-aware Approach"):
    relu(BN(BN(3x3 x) + 1x1 x + x)), the identity only when w_in == w_out and stride 1.

    The BatchNorm placement is what makes the fused kernel quantize well: RepVGG's identity BN
    adds gamma / sqrt(var + eps) to the centre tap of each output channel, and where a channel's
    variance is small that entry dwarfs the rest of the fused 3x3 kernel, so one int8 scale per
    channel must span an outlier (RepVGG-A0 is reported to drop from ~72% to ~52% top-1 under
    plain PTQ). Here the 1x1 and identity branches carry no BN (their sum enters the kernel with
    weight 1 and the 1x1's trained weights), and one BN after the sum scales the whole block, so
    no branch can blow up a single tap. Deploy form: still one 3x3 conv with bias: fold the 3x3's
    BN, merge the three linear branches into one conv, fold the BN after the sum into it."""

    name = "qarepvgg"

    @staticmethod
    def complexity(cx: Cx, w_in: int, w_out: int, stride: int, stage: StageSpec) -> Cx:
        """3x3 conv + BN, a bare 1x1 conv, the identity (no params), one BN after the sum."""
        groups = stage.train_form_groups(w_in)
        branch_cx(cx, lambda side: conv2d_cx(side, w_in, w_out, 1, stride, groups))
        conv_bn_cx(cx, w_in, w_out, 3, stride, groups)
        return norm2d_cx(cx, w_out)

    def __init__(self, w_in: int, w_out: int, stride: int, stage: StageSpec):
        super().__init__()
        groups = stage.train_form_groups(w_in)
        self.conv3x3 = conv_bn(w_in, w_out, 3, stride, groups, act=None)
        self.conv1x1 = nn.Conv2d(w_in, w_out, 1, stride, 0, groups=groups, bias=False)
        self.identity = w_in == w_out and stride == 1
        self.bn = nn.BatchNorm2d(w_out)
        self.act = nn.ReLU()

    def branch_outputs(self, x):
        outputs = [self.conv3x3(x), self.conv1x1(x)]
        if self.identity:
            outputs.append(x)
        return outputs

    def forward(self, x: Tensor) -> Tensor:
        outputs = self.branch_outputs(x)
        total = outputs[0]
        for output in outputs[1:]:
            total = total + output
        return self.act(self.bn(total))


@register_block
class ACB(TrainFormBlock):
    """ACNet's asymmetric convolution block (Ding et al. 2019): relu(BN(3x3 x) + BN(1x3 x) +
    BN(3x1 x)). Deploy form: one 3x3 conv with bias (1x3 and 3x1 centre-embedded)."""

    name = "acb"

    @staticmethod
    def complexity(cx: Cx, w_in: int, w_out: int, stride: int, stage: StageSpec) -> Cx:
        groups = stage.train_form_groups(w_in)
        for kernel in ((1, 3), (3, 1)):
            branch_cx(cx, lambda side, k=kernel: conv_bn_cx(side, w_in, w_out, k, stride, groups))
        return conv_bn_cx(cx, w_in, w_out, 3, stride, groups)

    def __init__(self, w_in: int, w_out: int, stride: int, stage: StageSpec):
        super().__init__()
        groups = stage.train_form_groups(w_in)
        self.square = conv_bn(w_in, w_out, 3, stride, groups, act=None)
        self.horizontal = _conv_bn_rect(w_in, w_out, (1, 3), stride, groups)
        self.vertical = _conv_bn_rect(w_in, w_out, (3, 1), stride, groups)
        self.act = nn.ReLU()

    def branch_outputs(self, x):
        return [self.square(x), self.horizontal(x), self.vertical(x)]


def _conv_bn_rect(
    w_in: int, w_out: int, kernel: tuple[int, int], stride: int, groups: int
) -> nn.Sequential:
    padding = ((kernel[0] - 1) // 2, (kernel[1] - 1) // 2)
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(w_in, w_out, kernel, stride, padding, groups=groups, bias=False),
            bn=nn.BatchNorm2d(w_out),
        )
    )


@register_block
class DBB(TrainFormBlock):
    """Diverse Branch Block (Ding et al. 2021), KxK = 3:
    relu(BN(3x3 x) + BN(1x1 x) + BN(avg3x3(BN(1x1 x))) + BN(3x3'(BN(1x1 x)))).

    DBB's BNAndPad (pad the BN output with BN(0)) is written with standard ops: the 1x1 convs of
    the avg and 1x1->3x3 branches zero-pad by 1 and have no bias, so BN sees zeros at the border
    and emits BN(0) there; the avg-pool and the 3x3' then use no padding. This is exactly DBB's
    train form, and it makes the sequential merges exact (docs/rewrites.md: R6 border trap,
    R8 p2 = 0). Deploy form: one 3x3 conv with bias."""

    name = "dbb"

    @staticmethod
    def complexity(cx: Cx, w_in: int, w_out: int, stride: int, stage: StageSpec) -> Cx:
        groups = stage.train_form_groups(w_in)

        def average(side: Cx) -> Cx:
            conv_bn_cx(side, w_in, w_out, 1, groups=groups, padding=1)
            return norm2d_cx(pool2d_cx(side, w_out, 3, stride, 0), w_out)

        def pointwise_square(side: Cx) -> Cx:
            conv_bn_cx(side, w_in, w_in, 1, groups=groups, padding=1)
            return conv_bn_cx(side, w_in, w_out, 3, stride, groups, padding=0)

        branch_cx(cx, lambda side: conv_bn_cx(side, w_in, w_out, 1, stride, groups))
        branch_cx(cx, average)
        branch_cx(cx, pointwise_square)
        return conv_bn_cx(cx, w_in, w_out, 3, stride, groups)

    def __init__(self, w_in: int, w_out: int, stride: int, stage: StageSpec):
        super().__init__()
        groups = stage.train_form_groups(w_in)
        self.square = conv_bn(w_in, w_out, 3, stride, groups, act=None)
        self.pointwise = conv_bn(w_in, w_out, 1, stride, groups, act=None)
        self.avg = nn.Sequential(
            OrderedDict(
                conv=nn.Conv2d(w_in, w_out, 1, padding=1, groups=groups, bias=False),
                bn=nn.BatchNorm2d(w_out),
                pool=nn.AvgPool2d(3, stride, padding=0),
                pool_bn=nn.BatchNorm2d(w_out),
            )
        )
        self.pointwise_square = nn.Sequential(
            OrderedDict(
                conv1=nn.Conv2d(w_in, w_in, 1, padding=1, groups=groups, bias=False),
                bn1=nn.BatchNorm2d(w_in),
                conv2=nn.Conv2d(w_in, w_out, 3, stride, padding=0, groups=groups, bias=False),
                bn2=nn.BatchNorm2d(w_out),
            )
        )
        self.act = nn.ReLU()

    def branch_outputs(self, x):
        return [self.square(x), self.pointwise(x), self.avg(x), self.pointwise_square(x)]


class MobileOneUnit(nn.Module):
    """One MobileOne re-parameterizable conv: act(se(Σ_k BN(KxK_k x) + BN(1x1 x) + BN(x))), the
    1x1 'scale' branch only when K > 1, the identity BN only when shapes allow; `act` None: no
    activation (FastViT's RepMixer), `se` None: no squeeze-excitation. `post_bn` (QARepVGG's
    placement, see `QARepVGG`): act(se(BN(Σ_k BN(KxK_k x) + 1x1 x + x))), no BN on the scale and
    identity branches, one BN after the sum."""

    def __init__(self, w_in: int, w_out: int, kernel: int, stride: int, groups: int,
                 branches: int, act: str | None = "relu", se: SqueezeExcitation | None = None,
                 post_bn: bool = False):
        super().__init__()
        self.convs = nn.ModuleList(
            conv_bn(w_in, w_out, kernel, stride, groups, act=None) for _ in range(branches)
        )
        shapes_match = w_in == w_out and stride == 1
        if post_bn:
            self.scale = (nn.Conv2d(w_in, w_out, 1, stride, 0, groups=groups, bias=False)
                          if kernel > 1 else None)
            self.identity = nn.Identity() if shapes_match else None
            self.bn = nn.BatchNorm2d(w_out)
        else:
            self.scale = (conv_bn(w_in, w_out, 1, stride, groups, act=None) if kernel > 1
                          else None)
            self.identity = nn.BatchNorm2d(w_out) if shapes_match else None
            self.bn = None
        self.se = se
        self.act = None if act is None else ACTIVATIONS[act]()

    def forward(self, x: Tensor) -> Tensor:
        total = self.convs[0](x)
        for conv in self.convs[1:]:
            total = total + conv(x)
        if self.scale is not None:
            total = total + self.scale(x)
        if self.identity is not None:
            total = total + self.identity(x)
        if self.bn is not None:
            total = self.bn(total)
        if self.se is not None:
            total = self.se(total)
        return total if self.act is None else self.act(total)

    @staticmethod
    def complexity(cx: Cx, w_in: int, w_out: int, kernel: int, stride: int, groups: int,
                   branches: int, post_bn: bool = False) -> Cx:
        """The twin of a unit without SE: `branches` kxk conv + BN, a 1x1 scale branch when
        k > 1 (conv + BN; a bare conv with `post_bn`), an identity BN when the shapes match (none
        with `post_bn`, which has one BN after the sum instead)."""
        if kernel > 1:
            scale = conv2d_cx if post_bn else conv_bn_cx
            branch_cx(cx, lambda side: scale(side, w_in, w_out, 1, stride, groups))
        if w_in == w_out and stride == 1 and not post_bn:
            norm2d_cx(cx, w_out)
        for _ in range(branches - 1):
            branch_cx(cx, lambda side: conv_bn_cx(side, w_in, w_out, kernel, stride, groups))
        conv_bn_cx(cx, w_in, w_out, kernel, stride, groups)
        return norm2d_cx(cx, w_out) if post_bn else cx


@register_block
class MobileOne(Block):
    """MobileOne block (Vasu et al. 2023): a depthwise 3x3 unit (stride s) then a pointwise 1x1
    unit, each with k over-parameterized conv branches (`branches`). Deploy form: a depthwise 3x3
    conv and a 1x1 conv, each with bias, each followed by ReLU."""

    name = "mobileone"
    uses = frozenset({"branches"})

    @staticmethod
    def complexity(cx: Cx, w_in: int, w_out: int, stride: int, stage: StageSpec) -> Cx:
        branches = stage.branches or 1
        MobileOneUnit.complexity(cx, w_in, w_in, 3, stride, w_in, branches)
        return MobileOneUnit.complexity(cx, w_in, w_out, 1, 1, 1, branches)

    def __init__(self, w_in: int, w_out: int, stride: int, stage: StageSpec):
        super().__init__()
        branches = stage.branches or 1
        self.depthwise = MobileOneUnit(w_in, w_in, 3, stride, w_in, branches)
        self.pointwise = MobileOneUnit(w_in, w_out, 1, 1, 1, branches)

    def forward(self, x: Tensor) -> Tensor:
        return self.pointwise(self.depthwise(x))


@register_block
class QAMobileOne(MobileOne):
    """MobileOne with QARepVGG's BatchNorm placement in both units (`MobileOneUnit(post_bn)`):
    depthwise `relu(BN(Σ_k BN(dw3x3_k x) + dw1x1 x + x))`, pointwise `relu(BN(Σ_k BN(1x1_k x) +
    x))`. Deploy form as `mobileone`: a depthwise 3x3 and a 1x1 conv, each with bias."""

    name = "qamobileone"

    @staticmethod
    def complexity(cx: Cx, w_in: int, w_out: int, stride: int, stage: StageSpec) -> Cx:
        branches = stage.branches or 1
        MobileOneUnit.complexity(cx, w_in, w_in, 3, stride, w_in, branches, post_bn=True)
        return MobileOneUnit.complexity(cx, w_in, w_out, 1, 1, 1, branches, post_bn=True)

    def __init__(self, w_in: int, w_out: int, stride: int, stage: StageSpec):
        Block.__init__(self)
        branches = stage.branches or 1
        self.depthwise = MobileOneUnit(w_in, w_in, 3, stride, w_in, branches, post_bn=True)
        self.pointwise = MobileOneUnit(w_in, w_out, 1, 1, 1, branches, post_bn=True)


@register_block
class MobileOneConv(Block):
    """One MobileOne unit as a block (`MobileOneUnit`): the stem of MobileOne (its Stage 1, a
    dense 3x3 stride 2) and FastViT's final conv (3x3 with group_width 1, i.e. one input channel
    per group, and SE). Deploy form: one conv with bias, [SE], act."""

    name = "mobileone_unit"
    uses = SE_FIELDS | {"kernel", "branches", "group_width", "groups", "activation"}

    @classmethod
    def check(cls, stage, w_in):
        which = "group_width" if stage.group_width else "groups"
        if stage.group_width and w_in % stage.group_width:
            return which, f"input width {w_in} is not divisible by group_width {stage.group_width}"
        groups = stage.unit_groups(w_in)
        for width, what in ((w_in, "input width"), (stage.width, "width")):
            if width % groups:
                return which, f"{what} {width} is not divisible by {groups} groups"
        return None

    @staticmethod
    def complexity(cx: Cx, w_in: int, w_out: int, stride: int, stage: StageSpec) -> Cx:
        """One MobileOne unit, then the stage's SE on w_out."""
        MobileOneUnit.complexity(cx, w_in, w_out, stage.kernel, stride, stage.unit_groups(w_in),
                                 stage.branches or 1)
        return squeeze_excitation_cx(cx, stage, w_in, w_out)

    def __init__(self, w_in: int, w_out: int, stride: int, stage: StageSpec):
        super().__init__()
        self.unit = MobileOneUnit(w_in, w_out, stage.kernel, stride, stage.unit_groups(w_in),
                                  stage.branches or 1, stage.activation,
                                  squeeze_excitation(stage, w_in, w_out))

    def forward(self, x: Tensor) -> Tensor:
        return self.unit(x)




@register_block
class ReduceNet(Block):
    """ReduceNet block (seed 004; github.com/ohmydroid/reducenet): `c(scaler * branch1(x) +
    branch2(x)) + proj(x)`, no activation after the sum. The train phase is scaler 1; the reduced
    phase is scaler 0, built without branch1 (its modules do not exist), so every other module has
    the same name in both phases and a train-phase checkpoint loads into the reduced model."""

    name = "reducenet"
    uses = frozenset({"expansion", "phase", "activation"})

    @classmethod
    def check(cls, stage, w_in):
        if int(round(stage.expansion * stage.width)) < 1:
            return "expansion", f"branch1 width round({stage.expansion:g} * {stage.width}) is 0"
        return None

    @staticmethod
    def complexity(cx: Cx, w_in: int, w_out: int, stride: int, stage: StageSpec) -> Cx:
        if stage.phase == "train":
            expanded = int(round(stage.expansion * w_out))
            branch_cx(cx, lambda side: conv_bn_cx(
                conv_bn_cx(side, w_in, expanded, 3, stride), expanded, w_out, 1))
        projection_cx(cx, w_in, w_out, stride)
        conv_bn_cx(cx, w_in, w_out, 3, stride)
        return conv_bn_cx(cx, w_out, w_out, 3)

    def __init__(self, w_in: int, w_out: int, stride: int, stage: StageSpec):
        super().__init__()
        act = stage.activation
        self.branch1 = None
        if stage.phase == "train":
            expanded = int(round(stage.expansion * w_out))
            self.branch1 = nn.Sequential(
                OrderedDict(
                    a=conv_bn(w_in, expanded, 3, stride, act=act),
                    b=conv_bn(expanded, w_out, 1, act=act),
                )
            )
        self.branch2 = conv_bn(w_in, w_out, 3, stride, act=act)
        self.c = conv_bn(w_out, w_out, 3, act=None)
        self.proj = projection(w_in, w_out, stride)

    def forward(self, x: Tensor) -> Tensor:
        y = self.branch2(x)
        if self.branch1 is not None:
            y = self.branch1(x) + y
        shortcut = x if self.proj is None else self.proj(x)
        return self.c(y) + shortcut
