"""timm entry points for :class:`~yoloattn.models.BiFormer`: ``timm.create_model('biformer_tiny', ...)``.

:func:`register_timm` registers ``biformer_tiny``, ``biformer_small`` and ``biformer_base`` with timm
(``import yoloattn`` calls it; timm has no plugin discovery, so the registration must run before
``timm.create_model``). Then, as for timm's own models::

    timm.create_model('biformer_tiny', pretrained=True,
                      pretrained_cfg_overlay=dict(file='path/to/biformer_tiny_best.pth'))
    timm.create_model('biformer_small', features_only=True, out_indices=(1, 2, 3))   # strides 8, 16, 32
    timm.create_model('biformer_base', num_classes=10, drop_path_rate=0.3)

Nothing is downloaded: the configs have no URL (the official OneDrive links are not persistent), and
``pretrained=True`` without a local file raises ``ValueError`` saying what to pass.

Differences from the official timm factories (models/biformer.py), deliberate:

- they work on current timm: everything goes through ``build_model_with_cfg`` (the official factories
  forwarded timm's ``cache_dir`` into the model and failed on timm >= 1.0.13);
- a local file is read with :func:`~yoloattn.models.checkpoint_state_dict`: the ``'model'`` weights, as the
  official loader. timm's own file loader prefers ``'model_ema'`` when the file has it (the official
  training script saves one by default), which would silently load the EMA weights instead of the ones
  the reported accuracies belong to. The weights then reach timm as the config's in-memory
  ``state_dict`` (dropped from ``model.pretrained_cfg`` afterwards), so timm's usual handling still
  applies: a new ``num_classes`` drops the head, ``in_chans != 3`` adapts the first conv, and
  ``features_only`` loads before pruning;
- the configs state the official evaluation transform (bicubic resize to 256, centre crop 224, ImageNet
  mean/std: ``crop_pct=0.875``), not the ViT defaults the official factories attached, and
  ``fixed_input_size=False`` (``auto_pad=True`` takes any size);
- ``features_only`` uses timm's ``FeatureGetterNet`` (``forward_intermediates``): the default
  ``FeatureListNet`` cannot rebuild BiFormer's interleaved ``downsample_layers``/``stages`` lists. The
  features are the raw stage outputs (NCHW, ``feature_info`` channels/reductions as timm's models).

timm's ``create_model(checkpoint_path=...)`` goes through timm's own loader (``'model_ema'`` first); for an
official file use ``pretrained=True, pretrained_cfg_overlay=dict(file=...)``. Tested with timm 1.0.31.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from .biformer import BIFORMER_ARCHS, BiFormer, checkpoint_state_dict

# A list, not a tuple: timm's register_model appends the model names to the module's __all__.
__all__ = ["register_timm"]

LOGGER = logging.getLogger("yoloattn")
_ORIGIN = "https://github.com/rayleizhu/BiFormer"


def _cfg() -> dict[str, Any]:
    return dict(url="", num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.875,
                interpolation="bicubic", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                first_conv="downsample_layers.0.0", classifier="head", fixed_input_size=False, origin_url=_ORIGIN,
                paper_name="BiFormer: Vision Transformer with Bi-Level Routing Attention", paper_ids="arXiv:2303.08810")


# read by timm's register_model at registration (plain dicts: no timm import needed to define them)
default_cfgs: dict[str, dict[str, Any]] = {name: _cfg() for name in BIFORMER_ARCHS}


def _cfg_value(cfg, name: str):
    if isinstance(cfg, dict):
        return cfg.get(name)
    return getattr(cfg, name, None) if cfg is not None and not isinstance(cfg, str) else None


def _unwrap_model_key(state_dict: dict, model=None) -> dict:
    """timm's ``pretrained_filter_fn``: a whole official checkpoint (URL / hub loads) -> its ``'model'`` weights."""
    if "model" in state_dict or "state_dict" in state_dict:
        return checkpoint_state_dict(state_dict)
    return state_dict


def _create(variant: str, pretrained: bool = False, pretrained_cfg=None, pretrained_cfg_overlay=None,
            **kwargs) -> BiFormer:
    from timm.models import build_model_with_cfg

    overlay = dict(pretrained_cfg_overlay or {})
    if pretrained:
        def source(name):
            return overlay.get(name) or _cfg_value(pretrained_cfg, name)

        if source("state_dict") is None:
            file = source("file")
            if file:
                overlay["state_dict"] = checkpoint_state_dict(file)  # the 'model' weights, never 'model_ema'
                overlay.setdefault("file", os.fspath(file))
            elif not (source("url") or source("hf_hub_id")):
                raise ValueError(
                    f"timm.create_model({variant!r}, pretrained=True) needs a local checkpoint: yoloattn downloads "
                    f"nothing. Pass pretrained_cfg_overlay=dict(file='path/to/{variant}_best.pth') (an official "
                    f"BiFormer checkpoint, weights under 'model'), or pretrained=False")
    model = build_model_with_cfg(
        BiFormer, variant, pretrained, pretrained_cfg=pretrained_cfg, pretrained_cfg_overlay=overlay,
        pretrained_filter_fn=_unwrap_model_key, feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls="getter"),
        **dict(BIFORMER_ARCHS[variant], **kwargs))
    # the in-memory weights were only a loading channel: do not keep a second copy alive in the config
    for module in (model, getattr(model, "model", None)):
        cfg = getattr(module, "pretrained_cfg", None)
        if isinstance(cfg, dict) and cfg.get("state_dict") is not None:
            cfg["state_dict"] = None
    return model


def biformer_tiny(pretrained: bool = False, **kwargs) -> BiFormer:
    """timm entry point of BiFormer-T; kwargs as ``timm.create_model`` / :class:`~yoloattn.models.BiFormer`."""
    return _create("biformer_tiny", pretrained, **kwargs)


def biformer_small(pretrained: bool = False, **kwargs) -> BiFormer:
    """timm entry point of BiFormer-S."""
    return _create("biformer_small", pretrained, **kwargs)


def biformer_base(pretrained: bool = False, **kwargs) -> BiFormer:
    """timm entry point of BiFormer-B."""
    return _create("biformer_base", pretrained, **kwargs)


_ENTRY_POINTS = (biformer_tiny, biformer_small, biformer_base)


def register_timm(*, strict: bool = False) -> bool:
    """Register ``biformer_tiny/small/base`` with timm (idempotent).

    Args:
        strict: raise when it cannot register (timm missing, or a name taken by another package's model)
            instead of returning False.

    Returns:
        True if all three names create yoloattn's BiFormer; False (the reason logged on the ``yoloattn``
        logger at DEBUG) otherwise, e.g. when timm is not installed.
    """
    try:
        from timm.models import is_model, model_entrypoint, register_model
    except ImportError as error:
        reason = f"timm is not importable ({error}); `pip install timm` to create BiFormer with timm.create_model"
        LOGGER.debug("yoloattn: BiFormer not registered with timm: %s", reason)
        if strict:
            raise ImportError(reason) from error
        return False
    taken = []
    for fn in _ENTRY_POINTS:
        if not is_model(fn.__name__):
            register_model(fn)
        elif model_entrypoint(fn.__name__) is not fn:
            taken.append(fn.__name__)  # someone else's model under that name: leave it
    if taken:
        reason = (f"timm already has models named {taken} from another package; yoloattn did not replace them "
                  f"(use yoloattn.models.{taken[0]} directly)")
        LOGGER.debug("yoloattn: %s", reason)
        if strict:
            raise RuntimeError(reason)
        return False
    return True
