"""The published teacher sets gapkd knows by name: where each comes from, its licence, the layout of
its files, the architecture of each file and the accuracy its authors report.

A teacher is then named ``zoo:SET/NAME`` (``zoo:mdistiller/resnet32x4``) wherever a checkpoint is
accepted, once ``gapkd teachers fetch SET`` or ``gapkd teachers import PATH`` installed it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..core.errors import ConfigError, suggest

PREFIX = "zoo:"


@dataclass(frozen=True)
class TeacherFile:
    """One checkpoint of a set."""

    name: str  #: the name after ``zoo:SET/``
    arch: str  #: the gapkd model it loads into (gapkd list models)
    member: str  #: its path in the archive or folder, matched as a suffix (any folders above it are allowed)
    num_classes: int
    reported_acc: Optional[float]  #: top-1 (%) on the set's dataset, as its authors report it
    url: Optional[str] = None  #: for sets published file by file
    sha256_prefix: Optional[str] = None  #: what the publisher's file name promises (torchvision's hash suffix)
    in_channels: int = 3


@dataclass(frozen=True)
class TeacherSet:
    name: str
    title: str
    dataset: str
    source: str  #: the page that publishes it
    licence: str
    layout: str  #: how its files are laid out, in words
    files: tuple[TeacherFile, ...]
    url: Optional[str] = None  #: one archive holding every file, when published so
    input: str = ""  #: the input the teachers expect, in words

    def file(self, name: str) -> TeacherFile:
        for entry in self.files:
            if entry.name.lower() == name.lower():
                return entry
        names = [entry.name for entry in self.files]
        raise ConfigError(f"teacher set {self.name!r} has no teacher {name!r}.{suggest(name, names)} Its teachers: {', '.join(names)}.")


def _cifar100(arch: str, folder: str, acc: float) -> TeacherFile:
    return TeacherFile(arch if folder == arch else folder, arch, f"{folder}_vanilla/ckpt_epoch_240.pth", 100, acc)


_TORCHVISION = "https://download.pytorch.org/models/"


def _torchvision(name: str, arch: str, filename: str, acc: float) -> TeacherFile:
    return TeacherFile(name, arch, filename, 1000, acc, url=_TORCHVISION + filename, sha256_prefix=filename.rsplit("-", 1)[1].split(".")[0])


CATALOGUE: dict[str, TeacherSet] = {
    "mdistiller": TeacherSet(
        name="mdistiller",
        title="CIFAR-100 teachers of RepDistiller (CRD, ICLR 2020), as released by mdistiller (DKD, CVPR 2022)",
        dataset="cifar100",
        source="https://github.com/megvii-research/mdistiller/releases/tag/checkpoints",
        url="https://github.com/megvii-research/mdistiller/releases/download/checkpoints/cifar_teachers.tar",
        licence="mdistiller's repository is MIT-licensed (its LICENSE also carries RepDistiller's notice); the release "
                "states no separate terms for the weights. Check the source page before redistributing them.",
        layout="cifar_teachers.tar -> cifar_teachers/<arch>_vanilla/ckpt_epoch_240.pth, the state dict under 'model'. "
               "RepDistiller's own files (save/models/<arch>_vanilla/ckpt_epoch_240.pth; its download server is gone) "
               "have the same names and layout and import into this set too.",
        input="32x32 CIFAR-100 images, mean (0.5071, 0.4867, 0.4408), std (0.2675, 0.2565, 0.2761), RGB",
        files=(
            _cifar100("resnet56", "resnet56", 72.34),
            _cifar100("resnet110", "resnet110", 74.31),
            _cifar100("resnet32x4", "resnet32x4", 79.42),
            _cifar100("wrn_40_2", "wrn_40_2", 75.61),
            _cifar100("vgg13", "vgg13", 74.64),
            TeacherFile("ResNet50", "resnet50_cifar", "ResNet50_vanilla/ckpt_epoch_240.pth", 100, 79.34),
        ),
    ),
    "torchvision": TeacherSet(
        name="torchvision",
        title="torchvision's ImageNet-1k weights (IMAGENET1K_V1), the teachers and student starts of the ImageNet and CUB recipes",
        dataset="imagenet",
        source="https://pytorch.org/vision/stable/models.html",
        licence="torchvision's code is BSD-3-Clause; the weights were trained on ImageNet, whose terms of access cover "
                "non-commercial research and education. Whether such terms bind the weights is for you to check on the source page.",
        layout="one file per model, <model>-<first 8 hex digits of its sha256>.pth, a bare state dict",
        input="224x224 ImageNet images, mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225), RGB",
        files=(
            _torchvision("resnet18", "resnet18", "resnet18-f37072fd.pth", 69.758),
            _torchvision("resnet34", "resnet34", "resnet34-b627a593.pth", 73.314),
            _torchvision("resnet50", "resnet50", "resnet50-0676ba61.pth", 76.130),
            _torchvision("resnet101", "resnet101", "resnet101-63fe2227.pth", 77.374),
            _torchvision("mobilenet_v2", "MobileNetV2_Imagenet", "mobilenet_v2-b0353104.pth", 71.878),
        ),
    ),
}


def teacher_set(name: str) -> TeacherSet:
    for key, value in CATALOGUE.items():
        if key.lower() == name.lower():
            return value
    raise ConfigError(f"unknown teacher set {name!r}.{suggest(name, CATALOGUE)} Known sets: {', '.join(CATALOGUE)} "
                      "(gapkd teachers list).")


def parse_reference(reference: str) -> tuple[TeacherSet, TeacherFile]:
    """``zoo:SET/NAME`` -> its set and file entry, or one clear error."""
    body = reference[len(PREFIX):] if reference.startswith(PREFIX) else reference
    if body.count("/") != 1 or not all(body.split("/")):
        raise ConfigError(f"{reference!r} is not a teacher reference; write zoo:SET/NAME, e.g. zoo:mdistiller/resnet32x4 "
                          "(gapkd teachers list shows them).")
    set_name, file_name = body.split("/")
    chosen = teacher_set(set_name)
    return chosen, chosen.file(file_name)
