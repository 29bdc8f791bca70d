"""Save and load converted models: safetensors weights + HF config + conversion config.

Folder layout (written to a temporary sibling folder, then renamed into place, so a failure never
leaves a half-written checkpoint)::

    config.json            the HF model config (quantization_config dropped: weights are dense)
    generation_config.json the model's generation settings (eos ids, sampling defaults), if it generates
    hedgehog.json          format, model class, LinearizeConfig, converted module names, sha256
    model.safetensors      every tensor of the converted model (originals + feature maps)
    tokenizer files        when a tokenizer is passed

:func:`load_linearized` rebuilds the architecture from ``config.json``, applies the same swap to
the same modules and loads the tensors strictly, so outputs are identical to the saved model's.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .base import linearize, linearized_modules
from .config import LinearizeConfig

__all__ = ["CheckpointError", "load_linearized", "save_linearized"]

FORMAT = "hedgehog-linearized/1"
WEIGHTS = "model.safetensors"
META = "hedgehog.json"
GENERATION = "generation_config.json"


class CheckpointError(ValueError):
    """A converted-model folder is missing files, has the wrong format, or is corrupted."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_linearized(model: nn.Module, directory: str | Path, tokenizer: Any = None) -> Path:
    """Write a linearized model to ``directory`` (replaced atomically if it exists); returns the path."""
    from safetensors.torch import save_model

    layers = linearized_modules(model)
    conv = getattr(model, "hedgehog_conversion", None)
    if not layers or conv is None or conv.config is None:
        raise ValueError("save_linearized needs a model converted with linearize() (no converted layer found)")
    if not hasattr(model, "config") or not hasattr(model.config, "to_dict"):
        raise TypeError(f"expected a transformers PreTrainedModel, got {type(model).__name__}")
    peft = sorted({type(m).__name__ for m in model.modules() if type(m).__module__.startswith("peft.")})
    if peft:
        # the adapter weights would be saved under names (and a model class) the rebuilt model lacks,
        # and load_linearized would only fail then
        raise ValueError(
            f"the model carries unmerged PEFT adapters ({', '.join(peft)}); merge them first "
            "(model = model.merge_and_unload(), as finetune() does) and save the merged model"
        )
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o777 & ~mask)  # mkdtemp makes 0700 folders; the checkpoint gets the usual mode
    try:
        cfg = model.config.to_dict()
        cfg.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str))
        # eos ids, pad id and sampling defaults live in the generation config, not in config.json;
        # written as is (save_pretrained would refuse the inconsistent flags some hub models ship)
        gen_cfg = getattr(model, "generation_config", None)
        if gen_cfg is not None and getattr(model, "can_generate", lambda: False)():
            gen_cfg.to_json_file(str(tmp / GENERATION))
        # save_model drops the duplicates of tied tensors (e.g. lm_head = embed_tokens) and
        # load_model re-ties them.
        save_model(model, str(tmp / WEIGHTS))
        lin_cfg = conv.config.to_dict()
        lin_cfg["targets"] = list(conv.converted) + list(conv.kept_softmax)
        lin_cfg["keep_softmax_layers"] = [len(conv.converted) + i for i in range(len(conv.kept_softmax))]
        meta = {
            "format": FORMAT,
            "model_class": type(model).__name__,
            # constructor options that the HF config does not record (BertModel without pooler)
            "init_kwargs": {"add_pooling_layer": False} if getattr(model, "pooler", "absent") is None else {},
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            # config.to_dict() leaves the attention implementation out; softmax layers kept in a
            # hybrid compute differently under eager and sdpa
            "attn_implementation": getattr(model.config, "_attn_implementation", None),
            "architecture": conv.architecture,
            "linearize": lin_cfg,
            "converted": list(conv.converted),
            "kept_softmax": list(conv.kept_softmax),
            "sha256": {WEIGHTS: _sha256(tmp / WEIGHTS)},
        }
        (tmp / META).write_text(json.dumps(meta, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def load_linearized(
    directory: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    verify: bool = True,
) -> nn.Module:
    """Rebuild a model saved by :func:`save_linearized` (in eval mode), under the attention
    implementation it was saved with; ``dtype`` casts the model's weights (the feature maps stay
    float32, as :func:`linearize` makes them).

    Raises :class:`CheckpointError` when files are missing, the format is unknown, the weights'
    checksum does not match (``verify=True``) or the tensors do not fit the rebuilt model.
    """
    import transformers
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    directory = Path(directory)
    if isinstance(dtype, str):  # "bfloat16" or "torch.bfloat16", as from_pretrained accepts
        name = dtype.removeprefix("torch.")
        if not isinstance(getattr(torch, name, None), torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}; pass a torch.dtype such as torch.bfloat16")
        dtype = getattr(torch, name)
    for name in ("config.json", META, WEIGHTS):
        if not (directory / name).is_file():
            raise CheckpointError(f"{directory} is not a converted-model folder: {name} is missing")
    try:
        meta = json.loads((directory / META).read_text())
        cfg_dict = json.loads((directory / "config.json").read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"corrupted checkpoint {directory}: unreadable JSON ({err})") from err
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{directory / META}: expected format {FORMAT!r}, got {meta.get('format')!r}")
    if verify:
        got = _sha256(directory / WEIGHTS)
        if got != meta["sha256"][WEIGHTS]:
            raise CheckpointError(
                f"corrupted checkpoint {directory}: {WEIGHTS} sha256 {got[:12]}... does not match the "
                f"recorded {meta['sha256'][WEIGHTS][:12]}... (truncated or modified file)"
            )
    cls = getattr(transformers, meta["model_class"], None)
    if cls is None:
        raise CheckpointError(f"unknown model class {meta['model_class']!r} in {directory / META}")
    config = transformers.AutoConfig.for_model(**cfg_dict)
    attn_impl = meta.get("attn_implementation") or cfg_dict.get("_attn_implementation") or "eager"
    try:
        model = cls._from_config(config, attn_implementation=attn_impl, **meta.get("init_kwargs", {}))
    except (ImportError, ValueError) as err:  # e.g. flash-attention saved on a GPU, loaded without it
        if attn_impl == "eager":
            raise
        warnings.warn(f"attn_implementation {attn_impl!r} unavailable ({err}); loading with 'eager'", stacklevel=2)
        model = cls._from_config(config, attn_implementation="eager", **meta.get("init_kwargs", {}))
    # cast before the swap: the feature maps stay float32 whatever the model dtype (the saved
    # tensors are cast into the parameters as they load)
    model.to(dtype=dtype if dtype is not None else getattr(torch, meta.get("dtype", "float32")))
    if (directory / GENERATION).is_file():
        try:
            model.generation_config = transformers.GenerationConfig.from_pretrained(str(directory))
        except (OSError, ValueError) as err:
            raise CheckpointError(f"corrupted checkpoint {directory}: unreadable {GENERATION} ({err})") from err
    linearize(model, LinearizeConfig.from_dict(meta["linearize"]))
    try:
        missing, unexpected = load_model(model, str(directory / WEIGHTS), strict=True)
    except (SafetensorError, RuntimeError, OSError) as err:
        raise CheckpointError(f"corrupted or incompatible checkpoint {directory}: {err}") from err
    return model.to(device).eval()
