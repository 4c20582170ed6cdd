"""Reading checkpoints safely: files, directories and hub names -> tensors + config, or ``CheckpointError``.

Nothing here unpickles arbitrary objects: pickled files go through ``torch.load(weights_only=True)``,
``.npz`` through ``np.load(allow_pickle=False)``. The container is recognised from the file's first bytes,
not its name, and every read error is turned into a ``CheckpointError`` that names the file.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import struct
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..models.config import ViTConfig
from ..models.registry import MODELS
from ._common import CheckpointError

# Hugging Face / timm names first; OpenCLIP's own files where a repository holds only those
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors", "open_clip_pytorch_model.bin")
CONFIG_FILES = ("config.json", "open_clip_config.json")
_NESTED = ("state_dict", "model", "module", "model_state_dict", "model_state")


@dataclass
class RawCheckpoint:
    """What a source holds, before any format is detected."""
    state_dict: dict[str, torch.Tensor]
    name: str  # what to call it in messages: the file read, or the hub name
    container: str  # safetensors | torch | npz | memory
    config: dict[str, Any] | None = None  # config.json next to the weights
    preprocessor: dict[str, Any] | None = None  # Hugging Face preprocessor_config.json
    meta: dict[str, Any] = field(default_factory=dict)  # class_names/mean/std from a Lightning checkpoint


def read(source: Any) -> RawCheckpoint:
    """A path, directory, ``hf-hub:``/``timm:`` name or in-memory state dict -> ``RawCheckpoint``.

    Example:
        >>> read({"patch_embed.proj.weight": torch.zeros(8, 3, 4, 4)}).container
        'memory'
    """
    if isinstance(source, Mapping):
        return RawCheckpoint(_unwrap(source, "<state dict>")[0], "<state dict>", "memory")
    if isinstance(source, str) and source.startswith(("hf-hub:", "timm:")):
        directory, name = resolve_hub(source)
        return read_directory(directory, name)
    path = Path(source)
    if path.is_dir():
        return read_directory({p.name: p for p in path.iterdir() if p.is_file()}, str(path))
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file or directory")
    return _read_file(path)


def _read_json(path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise CheckpointError(f"{path}: not a readable JSON file ({error})") from error
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_directory(files: Mapping[str, Path], name: str) -> RawCheckpoint:
    """A checkpoint from a directory's files (file name -> path): the weights, config.json, preprocessor config."""
    weights = next((files[f] for f in WEIGHT_FILES if f in files), None)
    if weights is None:
        candidates = sorted(f for f in files if f.endswith((".safetensors", ".bin", ".pth", ".pt", ".npz")))
        if len(candidates) != 1:
            shards = " (sharded checkpoints are not supported)" if any(".index.json" in f for f in files) else ""
            raise CheckpointError(f"{name}: expected one weights file ({' or '.join(WEIGHT_FILES)}), "
                                  f"found {candidates or 'none'}{shards}")
        weights = files[candidates[0]]
    raw = _read_file(Path(weights))
    raw.config = next((_read_json(files[f]) for f in CONFIG_FILES if f in files), None)
    raw.preprocessor = _read_json(files.get("preprocessor_config.json"))
    return raw


def _container(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(9)
    if not head:
        raise CheckpointError(f"{path}: the file is empty")
    if len(head) == 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < path.stat().st_size:
        return "safetensors"
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError, ValueError) as error:
            raise CheckpointError(f"{path}: a damaged zip archive ({error})") from error
        if any(n.endswith("data.pkl") for n in names):
            if any(n.endswith("constants.pkl") or "/code/" in n for n in names):
                raise CheckpointError(
                    f"{path}: a TorchScript archive (as OpenAI's CLIP .pt files are), not a state dict; load it "
                    f"with torch.jit.load if you trust it, then pass its .state_dict() to vit.load_pretrained "
                    f"(OpenAI's three extra entries there mark it as QuickGELU)")
            return "torch"
        if names and all(n.endswith(".npy") for n in names):
            return "npz"
        raise CheckpointError(f"{path}: a zip archive that is neither a torch.save file nor an .npz")
    if head[:1] == b"\x80":  # pickle protocol 2+: torch.save's legacy (non-zip) format
        return "torch"
    raise CheckpointError(f"{path}: not a checkpoint (expected safetensors, a torch.save file or .npz; "
                          f"the file starts with {head[:8]!r})")


def _read_file(path: Path) -> RawCheckpoint:
    container = _container(path)
    meta: dict[str, Any] = {}
    try:
        if container == "safetensors":
            from safetensors.torch import load_file
            tensors = load_file(str(path), device="cpu")
        elif container == "npz":
            tensors = _read_npz(path)
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
            tensors, meta = _unwrap(data, str(path))
    except CheckpointError:
        raise
    except pickle.UnpicklingError as error:
        raise _refused(path, error) from None
    except Exception as error:  # noqa: BLE001 — any failure inside a reader means a damaged file
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise CheckpointError(f"{path}: cannot read this {container} file; it is truncated or corrupt "
                              f"({type(error).__name__}: {first_line[:200]})") from error
    return RawCheckpoint(tensors, str(path), container, meta=meta)


def _refused(path: Path, error: Exception) -> CheckpointError:
    match = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
    what = f" ({match.group(1)})" if match else ""
    return CheckpointError(
        f"{path}: refused to load: the file holds pickled Python objects other than tensors{what}, which "
        "could run code when unpickled. Nothing from it was executed. If you trust the file, load it yourself "
        "with torch.load(path, weights_only=False) and pass the state dict to load_pretrained.")


def _read_npz(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    with np.load(path, allow_pickle=False) as archive:
        for key in archive.files:
            try:
                array = archive[key]
            except ValueError as error:
                if "allow_pickle" not in str(error):
                    raise
                # an object array is a pickle: numpy refused it before unpickling anything
                raise CheckpointError(
                    f"{path}: refused to load: array {key!r} holds pickled Python objects (dtype object), which "
                    "could run code when unpickled. Nothing from it was executed. A weights .npz holds numeric "
                    "arrays only.") from None
            if array.dtype.kind not in "fiub":
                raise CheckpointError(f"{path}: array {key!r} has dtype {array.dtype}, not a number")
            out[key] = torch.from_numpy(np.ascontiguousarray(array))
    return out


def _unwrap(data: Any, name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Find the state dict inside what ``torch.load`` returned (Lightning, DeiT and timm train checkpoints
    nest it), and the class names/normalisation/eval crop a Lightning checkpoint keeps in its hyper-parameters."""
    if not isinstance(data, Mapping):
        raise CheckpointError(f"{name}: expected a state dict (a mapping of names to tensors), "
                              f"got {type(data).__name__}")
    meta: dict[str, Any] = {}
    for hparams_key in ("hyper_parameters", "datamodule_hyper_parameters"):
        hparams = data.get(hparams_key)
        if isinstance(hparams, Mapping):
            meta.update({k: hparams[k] for k in ("class_names", "mean", "std", "crop_pct")
                         if hparams.get(k) is not None})
            meta.setdefault("hints", {}).update(_hparams_hints(hparams))
            if isinstance(hparams.get("architecture"), Mapping) and "text" in hparams["architecture"]:
                meta["image_text"] = dict(hparams["architecture"])  # an ImageTextModule checkpoint's two towers
    if not any(isinstance(v, torch.Tensor) for v in data.values()):
        nested = next((data[k] for k in _NESTED if isinstance(data.get(k), Mapping)), None)
        if nested is None:
            raise CheckpointError(f"{name}: no tensors found; top-level keys: {sorted(map(str, data))[:10]}")
        data = nested
    state_dict = {}
    for key, value in data.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{name}: entry {key!r} holds a {type(value).__name__}, not a tensor")
        state_dict[key] = value
    if not state_dict:
        raise CheckpointError(f"{name}: the state dict is empty")
    return state_dict, meta


def _hparams_hints(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """Architecture hints from our task modules' hyper-parameters: ``backbone`` (``arch`` name + overrides), or
    the same keys at the top level in checkpoints written before the backbone description existed."""
    if isinstance(hparams.get("backbone"), Mapping):
        hparams = hparams["backbone"]
    hints: dict[str, Any] = {}
    registered = MODELS.get(hparams["arch"]) if isinstance(hparams.get("arch"), str) else None
    if registered is not None:
        hints.update(registered.to_dict(training=False))
    hints.update({k: hparams[k] for k in ("num_heads", "img_size", "global_pool", "norm_eps")
                  if hparams.get(k) is not None})
    if "arch" in hparams and not hparams["arch"] and "num_heads" in hparams and "num_heads" not in hints:
        # our ImageClassifier built with neither arch nor num_heads: it got ViTConfig's default
        hints["num_heads"] = ViTConfig().num_heads
    return hints


# ---- Hugging Face hub ------------------------------------------------------------------------------------------
def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _cache_dir() -> str | None:
    # Read at call time: huggingface_hub reads these once at import, which would ignore later changes.
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None


def hub_repo(name: str) -> tuple[str, str | None]:
    """``hf-hub:ORG/REPO[@revision]`` or ``timm:model.tag`` -> (repo id, revision).

    Example:
        >>> hub_repo("timm:vit_small_patch16_224.augreg_in21k")
        ('timm/vit_small_patch16_224.augreg_in21k', None)
    """
    if name.startswith("timm:"):
        model_name = name[len("timm:"):]
        from timm.models import get_pretrained_cfg  # timm's own table of tags -> hub repos; offline
        cfg = get_pretrained_cfg(model_name)
        if cfg is None or not cfg.hf_hub_id:
            raise CheckpointError(f"{name}: timm knows no hub weights for {model_name!r} "
                                  "(see timm.list_pretrained())")
        return cfg.hf_hub_id, None
    repo = name[len("hf-hub:"):]
    repo, _, revision = repo.partition("@")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo):
        raise CheckpointError(f"{name}: expected hf-hub:ORG/REPO")
    return repo, revision or None


def resolve_hub(name: str, extra: tuple[str, ...] = (), weights: bool = True) -> tuple[dict[str, Path], str]:
    """Download (or find in the local cache) the weights and config files of a hub name, and the ``extra`` files
    the repository has (tokenizer files); ``weights=False`` fetches only the config and extra files.

    Example:
        >>> files, _ = resolve_hub("hf-hub:timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k")  # doctest: +SKIP
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    repo, revision = hub_repo(name)
    cache_dir, offline = _cache_dir(), _env_flag("HF_HUB_OFFLINE")

    def fetch(filename: str) -> Path | None:
        try:
            return Path(hf_hub_download(repo, filename, revision=revision, cache_dir=cache_dir,
                                        local_files_only=offline))
        except LocalEntryNotFoundError:  # offline (or no network) and not cached; before its parent class
            return None
        except EntryNotFoundError:
            return None
        except RepositoryNotFoundError as error:
            raise CheckpointError(f"{name}: no such repository on the Hugging Face hub ({repo})") from error
        except Exception as error:  # noqa: BLE001 — network and permission problems surface from many layers
            raise CheckpointError(f"{name}: could not fetch {filename} from the Hugging Face hub: {error}") from error

    files: dict[str, Path] = {}
    for filename in WEIGHT_FILES if weights else ():
        found = fetch(filename)
        if found is not None:
            files[filename] = found
            break
    if not files and weights:
        where = cache_dir or "the default Hugging Face cache (~/.cache/huggingface/hub)"
        reason = "HF_HUB_OFFLINE is set" if offline else "there is no network access or the repository lacks it"
        raise CheckpointError(
            f"{name}: needs {' or '.join(WEIGHT_FILES)} from the Hugging Face repository {repo}, but {reason} "
            f"and no copy is cached in {where}. Download it where there is internet "
            f"(`hf download {repo}`) and copy the cache, or pass a local path instead: "
            f"vit.load_pretrained('path/to/model.safetensors' or 'path/to/directory').")
    for filename in (*CONFIG_FILES, "preprocessor_config.json", *extra):
        found = fetch(filename)
        if found is not None:
            files[filename] = found
    return files, name
