"""Checkpoints without pickle: safetensors for every tensor, JSON for every scalar.

A resumable training checkpoint is a directory

    step_000100/
      config.json, generation_config.json, model.safetensors   # model.save_pretrained: loads in transformers
      optimizer.safetensors    # every optimizer state tensor, flattened: "state/<param index>/<name>"
      rng.safetensors          # torch CPU (and CUDA) generator states
      trainer_state.json       # step, optimizer param groups + scalar state, python/numpy RNG, caller state

written to `step_000100.tmp/` and renamed into place, so a crash mid-save never leaves a half
checkpoint that `latest_checkpoint` would pick. Nothing is ever read back with pickle: safetensors
and JSON only (`torch.load` is not used at all).

`save_for_serving` writes the final model + tokenizer with `save_pretrained(safe_serialization=True)`:
the directory transformers, TRL, PEFT and the TGI-protocol server load.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

STEP_DIR = re.compile(r"^step_(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def _flatten_optimizer(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split `optimizer.state_dict()` into named tensors and a JSON-able remainder."""
    import torch

    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, per_param in state_dict["state"].items():
        for name, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state/{idx}/{name}"] = value.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(str(idx), {})[name] = value
    groups = []
    for group in state_dict["param_groups"]:
        g = {}
        for k, v in group.items():
            if isinstance(v, torch.Tensor):  # e.g. a tensor lr: stored as a float
                v = v.item()
            g[k] = list(v) if isinstance(v, tuple) else v
        groups.append(g)
    return tensors, {"param_groups": groups, "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, idx, name = key.split("/", 2)
        state.setdefault(int(idx), {})[name] = value
    for idx, per_param in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(per_param)
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    import numpy as np
    import torch

    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    version, internal, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    scalars = {
        "python": [version, list(internal), gauss],
        "numpy": [np_name, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)],
    }
    return tensors, scalars


def _restore_rng(tensors: dict[str, torch.Tensor], scalars: dict[str, Any]) -> None:
    import numpy as np
    import torch

    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("torch_cuda_"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = scalars["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = scalars["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def save_checkpoint(
    directory: str | Path,
    model: PreTrainedModel,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
) -> Path:
    """Write a resumable checkpoint to `directory` atomically; `state` is JSON-able caller state (step, ...)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    rng_tensors, rng_scalars = _rng_state()
    save_file(rng_tensors, str(tmp / "rng.safetensors"))
    payload = {**state, "optimizer": opt_meta, "rng": rng_scalars}
    (tmp / "trainer_state.json").write_text(json.dumps(payload))
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)
    return directory


def load_model(directory: str | Path, device: str = "cpu") -> PreTrainedModel:
    """The model of a checkpoint or final directory (safetensors weights, fp32)."""
    import torch
    from transformers import AutoModelForCausalLM

    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {directory}: not a model checkpoint directory")
    if not any(directory.glob("*.safetensors")):
        raise FileNotFoundError(f"no *.safetensors weights in {directory}; refusing to fall back to pickle")
    model = AutoModelForCausalLM.from_pretrained(
        str(directory), dtype=torch.float32, local_files_only=True, use_safetensors=True
    )
    return model.to(device)


def restore_training_state(directory: str | Path, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Load optimizer state and RNG states from a checkpoint into place; return the caller state (step, ...)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    state_file = directory / "trainer_state.json"
    if not state_file.is_file():
        raise FileNotFoundError(f"no trainer_state.json in {directory}: not a resumable checkpoint")
    state = json.loads(state_file.read_text())
    opt_meta = state.pop("optimizer")
    rng_scalars = state.pop("rng")
    optimizer.load_state_dict(_unflatten_optimizer(load_file(str(directory / "optimizer.safetensors")), opt_meta))
    _restore_rng(load_file(str(directory / "rng.safetensors")), rng_scalars)
    return state


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints under `output_dir`/checkpoints, oldest first (half-written *.tmp ignored)."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def prune_checkpoints(output_dir: str | Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` checkpoints."""
    found = list_checkpoints(output_dir)
    for path in found[: max(len(found) - keep_last, 0)]:
        shutil.rmtree(path)


def save_for_serving(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, directory: str | Path
) -> Path:
    """Model + tokenizer as one `from_pretrained` directory, safetensors + JSON only."""
    from models.tokenizer import save_tokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory), safe_serialization=True)
    save_tokenizer(tokenizer, directory)
    return directory
