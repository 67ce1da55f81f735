"""The one config schema (pydantic), YAML recipes and dotted ``key=value`` overrides.

A run is fully described by a :class:`RunConfig`; what is written to a run directory's
``config.yaml`` loads back to the same run. Method hyper-parameters live in each method's
own dataclass and are validated against it here, so a typo anywhere fails before training.
"""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer, model_validator

from .core.errors import ConfigError, suggest
from .core.io import check_file
from .core.plugins import check_file_plugins, import_plugins, plugin_list, with_command_line_plugins


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


#: How a field counts in a run's identity, marked on the field itself (``identity(...)``). Two identities:
#: ``run_hash`` (:meth:`RunConfig.hparams_hash`: a run directory's config hash, which resume and the
#: default run name check) and ``study_key`` (:func:`gapkd.study.run_key`: a study run across machines).
#: Each is "always" (the default: the value changes the result), "never" (where files go, what is
#: logged: not part of the run), "when-set" (added after runs existed: hashed only when it differs
#: from its default, so every earlier run keeps its hash) or "file-name" (a path hashed by its file
#: name alone: where a file lies on one machine is not part of the run).
IDENTITY_MARKS = ("always", "never", "when-set", "file-name")


def identity(run_hash: str = "always", study_key: str = "always") -> dict[str, Any]:
    """The ``json_schema_extra`` that marks a field's part in the run hash and the study key."""
    assert run_hash in IDENTITY_MARKS and study_key in IDENTITY_MARKS
    return {"identity": {"run_hash": run_hash, "study_key": study_key}}


def identity_payload(model: BaseModel, which: str, dumped: dict[str, Any] | None = None) -> dict[str, Any]:
    """``model`` as JSON (``model_dump(mode="json")``) with each field kept, dropped or kept-when-set
    by its ``which`` mark (run_hash or study_key); nested sections follow their own fields' marks."""
    dumped = model.model_dump(mode="json") if dumped is None else dumped
    payload = {}
    for name, info in type(model).model_fields.items():
        mark = ((info.json_schema_extra or {}).get("identity") or {}).get(which, "always")
        if name not in dumped:  # a section that leaves a field out of its dump where unset (ModelConfig's hf, input)
            continue
        if mark == "never" or (mark == "when-set" and dumped[name] == _json(info.get_default(call_default_factory=True))):
            continue
        value = getattr(model, name)
        if mark == "file-name" and dumped[name] is not None:
            payload[name] = Path(dumped[name]).name
        elif isinstance(value, MethodConfig):
            payload[name] = _method_identity(dumped[name], which)
        else:
            payload[name] = identity_payload(value, which, dumped[name]) if isinstance(value, _Strict) else dumped[name]
    return payload


def _method_identity(dumped: dict[str, Any], which: str) -> dict[str, Any]:
    """The method section as hashed: a hyper-parameter its dataclass marks "when-set"
    (``gapkd.methods.base.added_later``) is left out while it holds its default."""
    from .methods import METHODS  # the methods own their hyper-parameter schemas

    if dumped.get("name") not in METHODS:
        return dumped
    fields = getattr(METHODS.get(dumped["name"]).Hparams, "__pydantic_fields__", {})
    out = {}
    for key, value in dumped.items():
        info = fields.get(key)
        mark = ((info.json_schema_extra or {}).get("identity") or {}).get(which, "always") if info is not None else "always"
        if mark == "when-set" and value == _json(info.get_default(call_default_factory=True)):
            continue
        out[key] = value
    return out


def _json(value: Any) -> Any:
    """A plain value as model_dump(mode="json") writes it (tuples as lists)."""
    return json.loads(json.dumps(value, default=str)) if not isinstance(value, BaseModel) else value.model_dump(mode="json")


class AugmentConfig(_Strict):
    """Training augmentation. In-memory datasets: random crop with zero padding + flip, in batch on the
    device. Streaming datasets (imagenet, cub200, image-folder-stream): random-resized crop + flip per
    image in the loader's workers, and resize + center crop for evaluation."""

    crop_padding: int = Field(4, ge=0, description="zero padding before the random crop (0 = no crop); in-memory datasets")
    flip: bool = Field(True, description="random horizontal flip")
    strong: bool = Field(
        False, json_schema_extra=identity(run_hash="when-set", study_key="when-set"), description="also give every training batch a strongly augmented view of the same images (its own crop and flip, "
        "then RandAugment with 2 operations and Cutout, as FixMatch and MLKD), batched on the device and seeded; methods read it "
        "as StepInfo.strong_images (mlkd needs it); in-memory datasets",
    )
    scale: tuple[float, float] = Field(
        (0.08, 1.0), json_schema_extra=identity(run_hash="when-set"), description="area fraction range of the random-resized crop (ImageNet standard 0.08..1); streaming datasets"
    )
    ratio: tuple[float, float] = Field(
        (3 / 4, 4 / 3), json_schema_extra=identity(run_hash="when-set"), description="aspect ratio range of the random-resized crop (log-uniform); streaming datasets"
    )
    eval_crop_fraction: float = Field(
        0.875, gt=0, le=1, json_schema_extra=identity(run_hash="when-set"), description="evaluation resizes the shorter side to image_size / this, then center-crops "
        "image_size (224/256 = 0.875); streaming datasets",
    )

    @model_validator(mode="after")
    def _check_ranges(self) -> "AugmentConfig":
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"augment.scale must satisfy 0 < low <= high <= 1, got {list(self.scale)}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"augment.ratio must satisfy 0 < low <= high, got {list(self.ratio)}")
        return self


class DataConfig(_Strict):
    name: str = Field("digits", description="dataset name (gapkd list datasets)")
    root: Optional[str] = Field(None, json_schema_extra=identity(study_key="never"), description="data root; default $GAPKD_DATA, then ~/.cache/gapkd/data")
    path: Optional[str] = Field(None, json_schema_extra=identity(study_key="file-name"), description="explicit folder or tarball (image-folder datasets)")
    verify: bool = Field(True, description="check official files against their published checksums")
    download: bool = Field(False, description="download missing official files (needs a network)")
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="fraction of train held out for validation (stratified)")
    split_seed: int = Field(0, description="seed of the train/validation split (fixed across runs)")
    train_subset: Optional[int] = Field(None, ge=1, description="keep only this many training samples (stratified)")
    test_subset: Optional[int] = Field(None, ge=1, description="evaluate on only this many test samples (stratified)")
    batch_size: int = Field(128, ge=1)
    eval_batch_size: int = Field(512, ge=1)
    drop_last: bool = Field(False, description="drop the last incomplete training batch")
    image_size: Optional[int] = Field(
        None, ge=8, json_schema_extra=identity(run_hash="when-set"), description="side of the square images a streaming dataset (imagenet, cub200, image-folder-stream) "
        "yields; default 224. In-memory datasets keep their own size and reject this key",
    )
    workers: Optional[int] = Field(
        None, ge=0, json_schema_extra=identity(run_hash="never"), description="worker processes decoding images for streaming datasets; default min(8, CPU cores); "
        "0 decodes in the training process. Batches do not depend on it",
    )
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    views: int = Field(
        0, ge=0, json_schema_extra=identity(run_hash="when-set", study_key="when-set"), description="0 = fresh random augmentation every step; K > 0 = each training image has K augmentations fixed by "
        "(data.view_seed, sample, view) and each epoch shows one of them (every view once per K epochs, in an order drawn from "
        "the run's seed). With K > 0 the frozen teacher's logits on every view are computed once and cached "
        "(data.teacher_cache), so logit methods skip the teacher's forward (docs/teacher-cache.md)",
    )
    view_seed: int = Field(0, json_schema_extra=identity(run_hash="when-set", study_key="when-set"), description="seed of the K fixed views (shared by the runs of a study so they share one teacher cache)")
    teacher_cache: bool = Field(
        True, json_schema_extra=identity(run_hash="never", study_key="never"), description="with data.views > 0: cache the teacher's logits on every view (and on val/test) under "
        "data.teacher_cache_dir; off = recompute the teacher on the same views every step (same result)",
    )
    teacher_cache_dir: Optional[str] = Field(None, json_schema_extra=identity(run_hash="never", study_key="never"), description="where teacher caches live; default $GAPKD_CACHE/teacher-logits")
    teacher_cache_topk: Optional[int] = Field(
        None, ge=1, json_schema_extra=identity(run_hash="when-set", study_key="when-set"), description="keep only the top-k logits per view (FKD-style, for >= 1000 classes); the rest are filled so "
        "that they share the remaining probability mass at temperature 1 (an approximation: docs/teacher-cache.md)",
    )

    @model_validator(mode="after")
    def _cache_needs_views(self) -> "DataConfig":
        if self.teacher_cache_topk is not None and self.views == 0:
            raise ValueError("data.teacher_cache_topk applies to the teacher cache, which needs fixed views: set data.views=K "
                             "(e.g. 8) or drop data.teacher_cache_topk")
        return self


class InputConfig(_Strict):
    """``teacher.input``: the images the teacher was trained on, when they differ from the data's. The
    student's batch is converted on the device, once per teacher forward (docs/teachers.md)."""

    size: Optional[int] = Field(None, ge=8, description="side of the square images the teacher was trained at (e.g. 224); "
                                "the batch is resized to it bilinearly (antialiased when shrinking). Default: the data's size")
    mean: Optional[list[float]] = Field(None, description="the teacher's per-channel normalisation mean, in its channel order, "
                                        "for images in [0, 1] (ImageNet: [0.485, 0.456, 0.406]). Default: the data's")
    std: Optional[list[float]] = Field(None, description="the teacher's per-channel normalisation std (ImageNet: "
                                       "[0.229, 0.224, 0.225]). Default: the data's")
    channels: Literal["rgb", "bgr"] = Field("rgb", description="the teacher's channel order (the data is RGB)")

    @model_validator(mode="after")
    def _mean_with_std(self) -> "InputConfig":
        if (self.mean is None) != (self.std is None):
            raise ValueError("teacher.input.mean and teacher.input.std go together: set both (or neither)")
        return self


class ModelConfig(_Strict):
    name: str = Field(..., description="model name (gapkd list models); 'hf' with hf=..., and taken from the catalogue with "
                      "checkpoint=zoo:SET/NAME when not given")
    checkpoint: Optional[str] = Field(None, description="weights to start from (required for a teacher): a file (.pt, .pth, "
                                      ".safetensors) or zoo:SET/NAME, a teacher installed with gapkd teachers fetch|import")
    hf: Optional[str] = Field(None, json_schema_extra=identity(run_hash="when-set", study_key="when-set"), description="a Hugging Face image classifier: a folder written by save_pretrained, or a hub "
                              'name (needs a network); pip install "gapkd[hf]"')
    input: Optional[InputConfig] = Field(None, json_schema_extra=identity(run_hash="when-set", study_key="when-set"), description="a teacher's input size, normalisation and channel order, when "
                                         "they differ from the data's (teacher only)")
    options: dict[str, Any] = Field(default_factory=dict, description="extra keyword arguments of the model factory")
    init_head: Literal["load", "reset"] = Field(
        "load", json_schema_extra=identity(run_hash="when-set", study_key="when-set"), description="the classifier's weights: 'load' takes them from checkpoint like every other weight (its class "
        "count must be the data's); 'reset' loads every other weight exactly and keeps the classifier freshly initialised for "
        "the data's classes, to start from weights trained on another label set (e.g. ImageNet's). A student's option: a "
        "distillation teacher's classifier gives the targets, so train the teacher first (gapkd train, where it is the student)",
    )

    @model_serializer(mode="wrap")
    def _without_unset_sources(self, handler):
        """``hf`` and ``input`` are left out where unset, so config.yaml and run hashes are what they
        were before these keys existed."""
        dumped = handler(self)
        for key in ("hf", "input"):
            if isinstance(dumped, dict) and dumped.get(key) is None:
                dumped.pop(key, None)
        return dumped

    @model_validator(mode="before")
    @classmethod
    def _names_from_sources(cls, data: Any) -> Any:
        """``hf=PATH`` makes the model 'hf' (its path kept in options, so checkpoints rebuild it); a
        ``zoo:SET/NAME`` checkpoint names its architecture."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        options = data.get("options") or {}
        if data.get("hf") is None and str(data.get("name", "")).lower() == "hf" and isinstance(options, dict) and options.get("path"):
            data["hf"] = options["path"]
        if data.get("hf") is not None:
            if str(data.setdefault("name", "hf")).lower() != "hf":
                raise ConfigError(f"hf={data['hf']} loads a Hugging Face model, but name is {data['name']!r}; drop name (or set name=hf).")
            data["name"] = "hf"
            data["options"] = {**(options if isinstance(options, dict) else {}), "path": str(data["hf"])}
        elif str(data.get("name", "")).lower() == "hf":
            raise ConfigError("name=hf is a Hugging Face model: set hf=FOLDER_OR_HUB_NAME (a folder written by save_pretrained).")
        checkpoint = data.get("checkpoint")
        if isinstance(checkpoint, str) and checkpoint.startswith("zoo:"):
            from .models import MODELS
            from .teachers.catalogue import parse_reference

            _, entry = parse_reference(checkpoint)
            name = data.setdefault("name", entry.arch)
            if MODELS.canonical(str(name)) != MODELS.canonical(entry.arch):
                raise ConfigError(f"checkpoint {checkpoint} is a {entry.arch}, but name is {name!r}; set name={entry.arch} (or drop name).")
        return data


class MethodConfig(BaseModel):
    """``name`` plus the method's hyper-parameters, validated against its dataclass."""

    model_config = ConfigDict(extra="allow")
    name: str = "ce"

    @property
    def hparams(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class OptimConfig(_Strict):
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(5e-4, ge=0)


class ScheduleConfig(_Strict):
    name: Literal["step", "cosine", "constant"] = "step"
    milestones: list[float] = Field(default_factory=lambda: [150, 180, 210], description="epochs where step decay applies")
    gamma: float = Field(0.1, gt=0, le=1)
    min_lr: float = Field(0.0, ge=0, description="cosine floor")
    warmup_epochs: float = Field(0.0, ge=0, description="linear warm-up length in epochs")


class TrainConfig(_Strict):
    epochs: int = Field(240, ge=1)
    grad_clip: Optional[float] = Field(None, gt=0, description="max gradient norm (of each parameter group, or of all "
                                       "of them together: train.grad_clip_mode)")
    grad_clip_mode: Literal["per_group", "global"] = Field(
        "per_group", json_schema_extra=identity(run_hash="when-set", study_key="when-set"), description="per_group: the student and each auxiliary network a method trains (prompt path, "
        "projector, embedding) are clipped separately, so a large auxiliary gradient cannot shrink the student's update; "
        "global: one norm over all trained parameters (the same for methods that train only the student)")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    amp: Literal["auto", "off", "bf16", "fp16"] = Field(
        "auto", description="auto = bf16 on CUDA and on CPUs with native bf16 (AVX512-BF16/AMX), off elsewhere")
    channels_last: Optional[bool] = Field(None, description="default: on wherever amp resolves to bf16/fp16")
    compile: Union[bool, Literal["inductor", "aot_eager", "eager", "cudagraphs"]] = Field(
        False, description="torch.compile the training forward (true = the inductor backend, or a backend name); "
        "compiling takes about a minute on CPU, so it pays off on long runs only")
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = Field(
        "default", json_schema_extra=identity(run_hash="when-set", study_key="when-set"), description="torch.compile mode when train.compile is on: reduce-overhead replays the step as CUDA graphs "
        "(removes per-kernel launch cost on GPUs, where small CIFAR models are launch-bound), max-autotune also searches "
        "kernel configurations (long first epoch)")
    fold_teacher_bn: bool = Field(
        True, json_schema_extra=identity(run_hash="when-set"), description="fold the frozen teacher's BatchNorm into its convolutions (same outputs up to rounding, faster)")

    @field_validator("amp", mode="before")
    @classmethod
    def _yaml_off(cls, value):
        """YAML reads a bare `off` (train.amp=off, `amp: off`) as false: that is the documented 'off'."""
        return "off" if value is False else value

    @model_validator(mode="after")
    def _mode_needs_compile(self) -> "TrainConfig":
        if self.compile_mode != "default" and self.compile not in (True, "inductor"):
            raise ValueError(f"train.compile_mode={self.compile_mode} is a mode of the inductor compiler, but train.compile="
                             f"{self.compile}: set train.compile=true")
        return self
    deterministic: bool = Field(False, description="deterministic algorithms (bit-exact resume on CPU holds without it)")
    log_every: int = Field(50, ge=1, json_schema_extra=identity(run_hash="never", study_key="never"), description="steps between progress updates")
    nonfinite: Literal["stop", "skip"] = Field("stop", description="on a NaN/Inf loss: stop, or skip the step and count it")
    threads: Optional[int] = Field(None, ge=1, json_schema_extra=identity(study_key="never"), description="CPU threads (torch.set_num_threads)")
    checkpoint_every: int = Field(1, ge=1, description="epochs between checkpoints (the last epoch always saves)")
    diagnostics: bool = Field(
        False, json_schema_extra=identity(run_hash="never"), description="log the KD-loss decomposition (diag/kd, diag/class, diag/inner, diag/tckd, diag/nckd, ...) of teacher "
        "vs student on the validation split each epoch, at the method's temperature (4 if it has none); runs with a teacher only",
    )
    tensorboard: bool = Field(
        False, json_schema_extra=identity(run_hash="never"), description="also write every metrics.jsonl record's numbers to run_dir/tensorboard "
        '(needs pip install "gapkd[tensorboard]")',
    )


class RunSection(_Strict):
    """``run.*``: where a run writes, never part of its identity. Stored as the top-level ``name`` and
    ``out_dir`` that recipes and config.yaml files have always used (both spellings are accepted)."""

    name: Optional[str] = Field(None, description="run directory name; default derived from the config and its hash")
    out_dir: str = Field("runs", description="parent of run directories")


def lift_run_section(tree: Any) -> Any:
    """A config tree with its ``run:`` section moved to the top-level ``name`` / ``out_dir`` keys."""
    if not isinstance(tree, dict) or "run" not in tree:
        return tree
    tree = dict(tree)
    section = tree.pop("run")
    if section is None:
        return tree
    choices = list(RunSection.model_fields)
    if not isinstance(section, dict):
        raise ConfigError(f"run must be a mapping of {', '.join(f'run.{c}' for c in choices)}, not {section!r}.")
    for key, value in section.items():
        if key not in choices:
            raise ConfigError(f"run.{key}: unknown key.{suggest(key, choices)} Valid keys here: {', '.join(choices)}.")
        if key in tree and tree[key] != value:
            raise ConfigError(f"run.{key}={value!r} and {key}={tree[key]!r} are both set; keep one (run.{key}).")
        tree[key] = value
    return tree


class RunConfig(_Strict):
    name: Optional[str] = Field(None, json_schema_extra=identity("never", "never"),
                                description="run directory name (also spelled run.name); default derived from the config")
    out_dir: str = Field("runs", json_schema_extra=identity("never", "never"), description="parent of run directories (also run.out_dir)")
    plugins: list[str] = Field(
        default_factory=list, json_schema_extra=identity(run_hash="when-set", study_key="when-set"), description="Python modules (mypkg.kd) or .py files (./my_method.py) that register "
        "methods, models or datasets; imported before the rest of the config is validated (docs/add-a-method.md)",
    )
    seed: int = 0
    data: DataConfig = Field(default_factory=DataConfig)
    student: ModelConfig
    teacher: Optional[ModelConfig] = None
    method: MethodConfig = Field(default_factory=MethodConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @model_validator(mode="before")
    @classmethod
    def _import_plugins(cls, data: Any) -> Any:
        """Plugins first: the method's hyper-parameters are validated against what they register.
        (And ``run.*`` lifted to the keys it is stored as.)"""
        data = lift_run_section(data)
        if isinstance(data, dict) and "plugins" in data:
            data = {**data, "plugins": plugin_list(data["plugins"])}
            import_plugins(data["plugins"])
        return data

    @model_validator(mode="after")
    def _check_method(self) -> "RunConfig":
        from .methods import METHODS  # the methods own their hyper-parameter schemas

        cls = METHODS.get(self.method.name)
        # assigned through __dict__: validate_assignment would re-run this validator forever
        self.__dict__["method"] = MethodConfig(name=METHODS.canonical(self.method.name), **validate_hparams(cls, self.method.hparams))
        if cls.needs_teacher and (self.teacher is None or not (self.teacher.checkpoint or self.teacher.hf)):
            raise ConfigError(
                f"method {self.method.name!r} needs a trained teacher: set teacher.name=... and teacher.checkpoint=PATH "
                "(a checkpoint from `gapkd train`, or one from the RepDistiller/mdistiller zoos)."
            )
        if getattr(cls, "needs_strong_view", False) and not self.data.augment.strong:
            raise ConfigError(f"method {self.method.name!r} trains on a weak and a strong view of every batch: set "
                              "data.augment.strong=true (the data pipeline then builds the strong view on the device).")
        if self.teacher is not None and self.teacher.init_head == "reset":
            raise ConfigError(
                "teacher.init_head=reset: a distillation teacher's classifier gives the targets, so it must be trained for "
                f"the classes of {self.data.name}. Train it first from those weights as the student of a CE run (gapkd train -c "
                f"<the teacher's recipe> student.name={self.teacher.name} student.checkpoint={self.teacher.checkpoint or 'PATH'} "
                "student.init_head=reset), then set teacher.checkpoint=<that run>/checkpoints/best.pt and drop teacher.init_head."
            )
        if self.student.input is not None:
            raise ConfigError("student.input: the student sees the data as it is; teacher.input converts the batch for a teacher "
                              "trained at another size or normalisation. Drop student.input (set data.image_size for streamed data).")
        if self.student.init_head == "reset" and not (self.student.checkpoint or self.student.hf):
            raise ConfigError("student.init_head=reset resets the classifier of a loaded checkpoint, but student.checkpoint is "
                              "not set: set student.checkpoint=PATH (or drop student.init_head).")
        return self

    def hparams_hash(self) -> str:
        """A short hash of everything that changes the result (not where it is written, not what is
        logged): the fields marked by :func:`identity` (run_hash)."""
        payload = identity_payload(self, "run_hash")
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:8]

    @property
    def run(self) -> "RunSection":
        """Where the run writes: ``run.name`` and ``run.out_dir`` (the top-level ``name`` and ``out_dir``)."""
        return RunSection(name=self.name, out_dir=self.out_dir)

    def default_name(self) -> str:
        teacher = f"{self.teacher.name}-" if self.teacher else ""
        return f"{self.data.name}_{teacher}{self.student.name}_{self.method.name}_s{self.seed}_{self.hparams_hash()}"

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def validate_hparams(method_cls, hparams: dict[str, Any]) -> dict[str, Any]:
    """Validate a method's hyper-parameters against its ``Hparams`` dataclass; return all of them."""
    import dataclasses

    fields = {f.name for f in dataclasses.fields(method_cls.Hparams)}
    for key in hparams:
        if key not in fields:
            raise ConfigError(
                f"method.{key}: {method_cls.__name__} has no hyper-parameter {key!r}.{suggest(key, fields)} "
                f"Its hyper-parameters: {', '.join(sorted(fields)) or 'none'}."
            )
    try:
        return dataclasses.asdict(method_cls.Hparams(**hparams))
    except ValidationError as error:
        raise ConfigError(_format_errors(error, prefix="method.")) from None


def _format_errors(error: ValidationError, prefix: str = "", root: type[BaseModel] | None = None) -> str:
    lines = []
    for item in error.errors():
        location = ".".join(str(part) for part in item["loc"])
        if item["type"] == "extra_forbidden" and root is not None:
            parent = _model_at(root, item["loc"][:-1])
            choices = list(parent.model_fields) if parent else []
            lines.append(f"{prefix}{location}: unknown key.{suggest(str(item['loc'][-1]), choices)} Valid keys here: {', '.join(choices)}.")
        elif item["type"] == "missing":
            lines.append(f"{prefix}{location}: required but not given.")
        else:
            lines.append(f"{prefix}{location}: {item['msg']} (got {item.get('input')!r}).")
    return "Invalid config:\n  " + "\n  ".join(lines)


def _model_at(root: type[BaseModel], loc) -> type[BaseModel] | None:
    model = root
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        annotation = field.annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            return None
    return model


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["a.b=1", "c=[1, 2]"]`` -> nested dict; values are parsed as YAML scalars/lists."""
    tree: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"override {pair!r} is not key=value (for example train.epochs=10).")
        key, raw = pair.split("=", 1)
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {pair!r} has an empty key; write dotted keys like optim.lr=0.1.")
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {pair!r} goes below {part!r}, which is set to a value.")
        node[parts[-1]] = value
    return tree


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    check_file(path, "config file", ConfigError, path / "config.yaml", "a run folder's config is")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML (or uses tags safe loading refuses): {error}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys, not a {type(loaded).__name__}.")
    check_file_plugins(loaded, path)  # a file is not trusted to run code (docs/reliability.md)
    return loaded


def build_config(
    base: dict[str, Any] | None = None, path: str | Path | None = None, overrides: list[str] | dict | None = None
) -> RunConfig:
    """defaults <- ``base`` <- YAML file <- overrides, validated into a RunConfig. The ``plugins``
    it lists (and those given with ``gapkd --plugin``) are imported before anything else is validated."""
    tree = lift_run_section(copy.deepcopy(base or {}))
    if path is not None:
        tree = merge(tree, lift_run_section(read_yaml(path)))
    if overrides:
        tree = merge(tree, lift_run_section(parse_overrides(overrides) if isinstance(overrides, list) else overrides))
    plugins = with_command_line_plugins(plugin_list(tree.get("plugins")))
    if plugins:
        tree["plugins"] = plugins
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as error:
        raise ConfigError(_format_errors(error, root=RunConfig)) from None
