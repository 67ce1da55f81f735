"""Which stage outputs the stage-wise relation methods (SP, VID, NST, KDSVD) pair.

RepDistiller and mdistiller zip the student's and the teacher's lists of stage outputs, so a pair
with unequal stage counts uses the first stages the two share. In gapkd's zoo, ShuffleV2 and
MobileNetV2 list their final 1x1 convolution as one more stage than RepDistiller's feature list
has; pairing the first ``min(len(student), len(teacher))`` stages gives the reference codes'
pairing on every standard CIFAR pair (resnet32x4 -> ShuffleV2: 3, vgg13 -> MobileNetV2: 4)."""
from __future__ import annotations

from ..core.errors import ConfigError


def shared_stage_count(student_stages, teacher_stages, method: str) -> int:
    """How many leading stage outputs a stage-wise method pairs; refuses models without stages."""
    count = min(len(student_stages), len(teacher_stages))
    if count == 0:
        raise ConfigError(
            f"{method} distils stage outputs, but the student has {len(student_stages)} and the teacher "
            f"{len(teacher_stages)}; wrap the model with gapkd.models.wrap_model(module, stages=[...]) or use a logit method (kd)."
        )
    return count


def resolve_stage(stage: int | None, student_stages, teacher_stages, method: str) -> int:
    """A 0-based stage index valid for both models; None: the last stage they share (RepDistiller's feat[-2])."""
    count = shared_stage_count(student_stages, teacher_stages, method)
    if stage is None:
        return count - 1
    if stage >= count:
        raise ConfigError(
            f"method.stage={stage}, but the student has {len(student_stages)} stages and the teacher {len(teacher_stages)}; "
            f"use a 0-based index below {count}, or leave method.stage unset for the last stage both have."
        )
    return stage
