"""The model zoo. Every model is a :class:`StagedNet`; build one with :func:`create_model`.
A model of your own becomes one with :func:`wrap_model`. See docs/models.md."""
from .base import Features, StagedNet
from .registry import MODELS, ModelEntry, create_model, list_models, register_model
from . import cifar_resnet, mobilenetv2, resnet, shufflenet, vgg, wrn  # noqa: F401  (register the zoo)
from .adapter import WrappedModel, wrap_model
from .checkpoint import classifier_keys, extract_state_dict, load_checkpoint, load_state_dict_strict

__all__ = ["load_checkpoint", "extract_state_dict", "load_state_dict_strict", "classifier_keys", "Features", "StagedNet", "MODELS", "ModelEntry",
           "create_model", "list_models", "register_model", "WrappedModel", "wrap_model"]
