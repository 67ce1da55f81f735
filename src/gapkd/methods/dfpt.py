"""Li et al., "Dual-Forward Path Teacher Knowledge Distillation: Bridging the Capacity Gap
Between Teacher and Student" (arXiv 2506.18244, 2025): DFPT-KD and DFPT-KD+.

The frozen teacher gets a second, prompt-based forward path: after chosen stages a prompt
block P_i and a fusion block F_i turn x_i into x~_i = F_i(x_i + P_i(x_i)), and the path ends
in its own head H_P. The prompt path learns from the labels, the original teacher and the
student; the student learns from the labels, the original teacher and the prompt path.
DFPT-KD trains only P_i, F_i and H_P; DFPT-KD+ also fine-tunes a copy of the teacher stages
on the prompt path. The original path is never changed. See docs/dfpt-kd.md.
"""
from __future__ import annotations

import copy
from typing import Annotated, Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ..core.errors import ConfigError
from ..models.base import init_conv_bn
from .base import Distiller, StepOutput, hparams, register_method
from .losses import kd_kl

#: C' = max(MIN_PROMPT_CHANNELS, C // r1), as the spec gives it
MIN_PROMPT_CHANNELS = 8


@hparams
class DFPTHparams:
    temperature: Annotated[float, Field(gt=0)] = 4.0
    """tau of every KL term (scaled by tau^2)."""
    student_ce_weight: Annotated[float, Field(ge=0)] = 0.1
    """alpha_ce: student cross-entropy on labels."""
    student_teacher_weight: Annotated[float, Field(ge=0)] = 0.45
    """alpha_T: student KL towards the original teacher path."""
    student_prompt_weight: Annotated[float, Field(ge=0)] = 0.45
    """alpha_P: student KL towards the (stop-gradient) prompt path."""
    prompt_ce_weight: Annotated[float, Field(ge=0)] = 1.0
    """lambda_ce: prompt-path cross-entropy on labels."""
    prompt_teacher_weight: Annotated[float, Field(ge=0)] = 1.0
    """lambda_T: prompt-path KL towards the original teacher path."""
    prompt_student_weight: Annotated[float, Field(ge=0)] = 1.0
    """lambda_S: prompt-path KL towards the (stop-gradient) student."""
    student_feedback: bool = True
    """Ablation: off sets lambda_S = 0 (the prompt path no longer follows the student)."""
    teacher_anchor: bool = True
    """Ablation: off sets lambda_T = 0 (the prompt path no longer follows the original teacher)."""
    use_prompts: bool = True
    """Ablation: off drops the prompt blocks, x~_i = F_i(x_i)."""
    use_fusion: bool = True
    """Ablation: off drops the fusion blocks, x~_i = x_i + P_i(x_i)."""
    insert_after: Optional[tuple[Annotated[int, Field(ge=0)], ...]] = None
    """Stages followed by a prompt (and fusion) block; default every stage but the last."""
    kernels: Annotated[tuple[Annotated[int, Field(gt=0)], ...], Field(min_length=1)] = (3, 5, 7)
    """Kernel sizes of the prompt block's parallel groups (one group per kernel)."""
    r1: Annotated[int, Field(ge=1)] = 4
    """Prompt-block channel reduction: C' = max(8, C // r1)."""
    r2: Annotated[float, Field(gt=0, le=1)] = 0.5
    """Fraction of the C' channels that go through the kernel groups (the rest pass unchanged)."""
    head_init: Literal["copy", "random"] = "copy"
    """The prompt head H_P starts as a copy of the teacher's classifier, or freshly initialised."""
    fusion: Literal["conv1x1", "gate"] = "conv1x1"
    """F_i: an identity-initialised 1x1 conv (ours), or a gate x * 2 sigmoid(1x1(ReLU(BN(1x1(x))))) whose last
    conv starts at zero, so the gate starts at 1 (the seed blog's "adaptive weighting"; the factor 2 is ours,
    so that the prompt path starts as the teacher)."""
    kl_tau2: bool = True
    """Scale every KL term by tau^2 (Hinton's convention, ours); off: the seed blog's unscaled KL terms."""
    prompt_lr_mult: Annotated[float, Field(gt=0)] = 1.0
    """Learning-rate multiplier of the prompt blocks, fusion blocks and prompt head."""
    prompt_wd_mult: Annotated[float, Field(ge=0)] = 1.0
    """Weight-decay multiplier of the prompt blocks, fusion blocks and prompt head (0: no decay; decay pulls the
    identity fusion and the copied head toward zero, not toward where they start)."""
    prompt_warmup_epochs: Annotated[float, Field(ge=0)] = 0.0
    """Linear learning-rate warm-up of the prompt group alone, in epochs (on top of the schedule)."""


@hparams
class DFPTPlusHparams(DFPTHparams):
    finetune_from_stage: Annotated[int, Field(ge=0)] = 0
    """First teacher stage whose copy is fine-tuned on the prompt path (0 also fine-tunes the stem)."""
    backbone_lr_mult: Annotated[float, Field(gt=0)] = 0.1
    """Learning-rate multiplier of the fine-tuned copy of the teacher stages."""
    backbone_bn: Literal["train", "frozen"] = "train"
    """BatchNorm of the fine-tuned copy: batch statistics in training (train) or the teacher's running ones (frozen)."""


def split_channels(channels: int, fraction: float, groups: int) -> list[int]:
    """Channel counts of the kernel groups: round(fraction * channels) channels (half up),
    at least one per group, split as evenly as possible with the larger groups first.
    For example 8 channels, fraction 0.5, 3 groups -> [2, 1, 1] (4 channels pass unchanged)."""
    if channels < groups:
        raise ConfigError(
            f"a prompt block with {channels} channels cannot hold {groups} kernel groups; use fewer method.kernels."
        )
    used = min(channels, max(groups, int(fraction * channels + 0.5)))
    return [used // groups + (1 if j < used % groups else 0) for j in range(groups)]


class PromptBlock(nn.Module):
    """P_i: 1x1 conv C -> C' + BN + ReLU; kernel groups (k x k conv, BN, ReLU, 1x1 conv) on part
    of the C' channels while the rest pass unchanged; a zero-initialised 1x1 conv C' -> C."""

    def __init__(self, channels: int, r1: int, r2: float, kernels: tuple[int, ...]):
        super().__init__()
        reduced = max(MIN_PROMPT_CHANNELS, channels // r1)
        self.group_channels = split_channels(reduced, r2, len(kernels))
        self.passed_channels = reduced - sum(self.group_channels)
        self.reduce = nn.Sequential(nn.Conv2d(channels, reduced, 1, bias=False), nn.BatchNorm2d(reduced), nn.ReLU())
        self.groups = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(c, c, k, padding="same", bias=False), nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c, 1, bias=False)
            )
            for c, k in zip(self.group_channels, kernels)
        )
        self.expand = nn.Conv2d(reduced, channels, 1)
        init_conv_bn(self)
        nn.init.zeros_(self.expand.weight)  # P_i(x) = 0 at the start: the prompt path is the teacher
        nn.init.zeros_(self.expand.bias)

    def forward(self, x: Tensor) -> Tensor:
        parts = torch.split(self.reduce(x), [*self.group_channels, self.passed_channels], dim=1)
        outputs = [group(part) for group, part in zip(self.groups, parts)]
        return self.expand(torch.cat([*outputs, parts[-1]], dim=1))


def identity_conv(channels: int) -> nn.Conv2d:
    """F_i: a 1x1 conv C -> C that starts as the identity."""
    conv = nn.Conv2d(channels, channels, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.eye(channels).view(channels, channels, 1, 1))
        conv.bias.zero_()
    return conv


class GateFusion(nn.Module):
    """F_i as a gate: x * 2 sigmoid(1x1(ReLU(BN(1x1(x))))), the last conv zero-initialised (gate 1 at start)."""

    def __init__(self, channels: int):
        super().__init__()
        self.inner = nn.Sequential(nn.Conv2d(channels, channels, 1, bias=False), nn.BatchNorm2d(channels), nn.ReLU())
        self.out = nn.Conv2d(channels, channels, 1)
        init_conv_bn(self.inner)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor) -> Tensor:
        return x * (2.0 * torch.sigmoid(self.out(self.inner(x))))


def dfpt_losses(student_logits: Tensor, prompt_logits: Tensor, teacher_logits: Tensor, labels: Tensor, h: DFPTHparams) -> dict[str, Tensor]:
    """The six weighted terms of L_prompt + L_student. sg(): the prompt-path terms send no
    gradient into the student and the student terms none into the prompt path."""
    tau = h.temperature
    # kd_kl scales by tau^2; without kl_tau2 that factor is taken back out
    kl_scale = 1.0 if h.kl_tau2 else 1.0 / (tau * tau)
    teacher_logits = teacher_logits.detach()
    return {
        "prompt_ce": h.prompt_ce_weight * F.cross_entropy(prompt_logits, labels),
        "prompt_teacher": (h.prompt_teacher_weight if h.teacher_anchor else 0.0) * kl_scale * kd_kl(prompt_logits, teacher_logits, tau),
        "prompt_student": (h.prompt_student_weight if h.student_feedback else 0.0) * kl_scale
        * kd_kl(prompt_logits, student_logits.detach(), tau),
        "student_ce": h.student_ce_weight * F.cross_entropy(student_logits, labels),
        "student_teacher": h.student_teacher_weight * kl_scale * kd_kl(student_logits, teacher_logits, tau),
        "student_prompt": h.student_prompt_weight * kl_scale * kd_kl(student_logits, prompt_logits.detach(), tau),
    }


@register_method("dfpt-kd", "dfpt")
class DFPTKD(Distiller):
    """DFPT-KD: a trained prompt path inside the frozen teacher teaches the student alongside the original path."""

    Hparams = DFPTHparams
    teacher_needs = "features"  # the prompt path runs inside the teacher's stages
    reads_teacher_logits = True  # the original path's logits come from the teacher cache when there is one

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None, **kwargs):
        super().__init__(student, teacher, **kwargs)
        h, teacher = self.hparams, self.teacher
        channels = list(teacher.stage_channels)
        stage_count = len(channels)
        if stage_count != len(teacher.stages):
            raise ConfigError(
                f"the teacher reports {len(teacher.stages)} stages but {stage_count} stage_channels; fix its StagedNet definition."
            )
        insert_after = sorted(set(range(stage_count - 1) if h.insert_after is None else h.insert_after))
        if insert_after and insert_after[-1] >= stage_count:
            raise ConfigError(
                f"method.insert_after={list(h.insert_after)}: the teacher has {stage_count} stages (0..{stage_count - 1})."
            )
        self.prompt_blocks = nn.ModuleDict(
            {str(i): PromptBlock(channels[i], h.r1, h.r2, h.kernels) for i in insert_after} if h.use_prompts else {}
        )
        fusion = identity_conv if h.fusion == "conv1x1" else GateFusion
        self.fusions = nn.ModuleDict({str(i): fusion(channels[i]) for i in insert_after} if h.use_fusion else {})
        self.prompt_head = copy.deepcopy(teacher.classifier).requires_grad_(True)
        if h.head_init == "random":
            for module in self.prompt_head.modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
        # Stages 0..shared_until are the same on both paths: computed once, without autograd.
        self.shared_until = insert_after[0] if insert_after else stage_count - 1

    # --- the two paths ---------------------------------------------------------------
    def prompt_stage(self, index: int) -> nn.Module:
        """Stage ``index`` as the prompt path runs it (DFPT-KD: the frozen teacher's own)."""
        return self.teacher.stages[index]

    def prompt_start(self, images: Tensor, shared: Tensor) -> Tensor:
        """The prompt path's input to stage shared_until + 1, before its prompt block."""
        return shared

    def prompt_pool(self, x: Tensor) -> Tensor:
        return self.teacher.forward_pool(x)

    def inject(self, index: int, x: Tensor) -> Tensor:
        """x~_i = F_i(x_i + P_i(x_i)) after the stages in insert_after; other stages pass x_i on."""
        key = str(index)
        if key in self.prompt_blocks:
            x = x + self.prompt_blocks[key](x)
        if key in self.fusions:
            x = self.fusions[key](x)
        return x

    def dual_forward(self, images: Tensor, teacher_logits: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(teacher logits z_T, prompt-path logits z_P). The original path runs without autograd
        and shares its stem and stages 0..shared_until with the prompt path; given the teacher's
        cached logits (data.views > 0), its stages after the shared ones are skipped."""
        stages = self.teacher.stages
        with torch.no_grad():
            x = self.teacher.forward_stem(images)
            for stage in stages[: self.shared_until + 1]:
                x = stage(x)
            shared = x
            if teacher_logits is None:
                for stage in stages[self.shared_until + 1 :]:
                    x = stage(x)
                teacher_logits = self.teacher.forward_head(x)[1]
        x = self.prompt_start(images, shared)
        if self.shared_until >= 0:
            x = self.inject(self.shared_until, x)
        for index in range(self.shared_until + 1, len(stages)):
            x = self.inject(index, self.prompt_stage(index)(x))
        return teacher_logits, self.prompt_head(self.prompt_pool(x))

    def forward(self, images, labels, step):
        teacher_logits, prompt_logits = self.dual_forward(images, step.teacher_logits)
        student_logits = self.student(images)
        return StepOutput(dfpt_losses(student_logits, prompt_logits, teacher_logits, labels, self.hparams), student_logits)

    # --- what trains and what is evaluated ------------------------------------------------
    def prompt_parameters(self) -> list[nn.Parameter]:
        """P_i, F_i and H_P."""
        return [*self.prompt_blocks.parameters(), *self.fusions.parameters(), *self.prompt_head.parameters()]

    def param_groups(self) -> list[dict]:
        return [
            {"params": list(self.student.parameters()), "lr_mult": 1.0, "name": "student"},
            {"params": self.prompt_parameters(), "lr_mult": self.hparams.prompt_lr_mult, "name": "prompt",
             "wd_mult": self.hparams.prompt_wd_mult, "warmup_epochs": self.hparams.prompt_warmup_epochs},
        ]

    def eval_heads(self, images: Tensor) -> dict[str, Tensor]:
        teacher_logits, prompt_logits = self.dual_forward(images)
        return {"student": self.student(images), "prompt": prompt_logits, "teacher": teacher_logits}


@register_method("dfpt-kd+", "dfpt+", "dfpt-kd-plus")
class DFPTKDPlus(DFPTKD):
    """DFPT-KD+: DFPT-KD whose prompt path also fine-tunes a copy of the teacher stages (low learning rate)."""

    Hparams = DFPTPlusHparams

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None, **kwargs):
        super().__init__(student, teacher, **kwargs)
        h, stage_count = self.hparams, len(self.teacher.stages)
        if h.finetune_from_stage >= stage_count:
            raise ConfigError(
                f"method.finetune_from_stage={h.finetune_from_stage}: the teacher has {stage_count} stages (0..{stage_count - 1})."
            )
        # A deep copy of the whole teacher, so its stem and pooling run through the StagedNet API
        # too; it shares no tensor with the frozen original.
        self.prompt_backbone = copy.deepcopy(self.teacher)
        frozen = {id(p) for p in self.prompt_backbone.classifier.parameters()}  # H_P is prompt_head
        for stage in self.prompt_backbone.stages[: h.finetune_from_stage]:
            frozen |= {id(p) for p in stage.parameters()}
        if h.finetune_from_stage > 0:  # the stem (whatever is in no stage) stays the teacher's
            in_stages = {id(p) for stage in self.prompt_backbone.stages for p in stage.parameters()}
            frozen |= {id(p) for p in self.prompt_backbone.parameters() if id(p) not in in_stages}
        for parameter in self.prompt_backbone.parameters():
            parameter.requires_grad_(id(parameter) not in frozen)
        self.shared_until = min(self.shared_until, h.finetune_from_stage - 1)
        self.train(self.training)

    def prompt_stage(self, index: int) -> nn.Module:
        return self.prompt_backbone.stages[index] if index >= self.hparams.finetune_from_stage else self.teacher.stages[index]

    def prompt_start(self, images: Tensor, shared: Tensor) -> Tensor:
        return self.prompt_backbone.forward_stem(images) if self.shared_until < 0 else shared

    def prompt_pool(self, x: Tensor) -> Tensor:
        return self.prompt_backbone.forward_pool(x)

    def backbone_parameters(self) -> list[nn.Parameter]:
        """The fine-tuned part of the teacher copy."""
        return [p for p in self.prompt_backbone.parameters() if p.requires_grad]

    def param_groups(self) -> list[dict]:
        return [
            *super().param_groups(),
            {"params": self.backbone_parameters(), "lr_mult": self.hparams.backbone_lr_mult, "name": "prompt_backbone"},
        ]

    def train(self, mode: bool = True) -> "DFPTKDPlus":
        super().train(mode)
        if self.hparams.backbone_bn == "frozen":
            for module in self.prompt_backbone.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self
