"""Base-weight writes (FLoRA, FedEx-LoRA): each party folds the broadcast's factors into its own frozen base weights,
and whoever loads a saved adapter adds the base weights' total change (``base_delta.safetensors``) first."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from fedsrd.algorithms import Algorithm, BaseDelta, State
from fedsrd.ops.aligned import aligned_state

logger = logging.getLogger(__name__)

BASE_DELTA_FILE = "base_delta.safetensors"  # next to the adapter: the base weights' total change, fp32


def quantization_reason(model: torch.nn.Module) -> str | None:
    """Why `model`'s base weights cannot be written to (bitsandbytes, GPTQ, AWQ, ... quantization), or None."""
    seen, candidates = set(), [model]
    while candidates:
        obj = candidates.pop()
        if obj is None or id(obj) in seen:
            continue
        seen.add(id(obj))
        candidates += [getattr(obj, "base_model", None), getattr(obj, "model", None)]
        if getattr(obj, "is_quantized", False) is True:
            return f"{type(obj).__name__}.is_quantized is True"
        if getattr(obj, "hf_quantizer", None) is not None:
            return f"{type(obj).__name__}.hf_quantizer is set"
        for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
            if getattr(obj, flag, False) is True:
                return f"{type(obj).__name__}.{flag} is True"
        config = getattr(obj, "config", None)
        if getattr(config, "quantization_config", None) is not None:
            return f"its config has a quantization_config ({type(config.quantization_config).__name__})"
    for name, param in model.named_parameters():
        if not param.dtype.is_floating_point or type(param).__name__ in ("Params4bit", "Int8Params"):
            return f"parameter {name!r} is {type(param).__name__} of dtype {param.dtype}"
    return None


def check_base_writable(model: torch.nn.Module, algorithm: Algorithm) -> None:
    """Raise ValueError, before any training, if `algorithm` writes into base weights and `model`'s are quantized."""
    if not algorithm.writes_base_weights:
        return
    reason = quantization_reason(model)
    if reason is not None:
        raise ValueError(
            f"algorithm {algorithm.name!r} merges updates into the base model's weights, so it needs an unquantized "
            f"base, but this model is quantized ({reason}). Load the base in float32/bfloat16/float16, or use an "
            "algorithm that keeps the base frozen (e.g. fedavg, fedsrd)."
        )


def _plain_weight_name(module_name: str) -> str:
    """The base model's own name for the weight of PEFT module `module_name` (no PEFT wrapper prefix)."""
    prefix = "base_model.model."
    return (module_name[len(prefix) :] if module_name.startswith(prefix) else module_name) + ".weight"


class BaseWeightWriter:
    """Folds `Algorithm.base_delta` factors into a PEFT model's frozen base weights and tracks their total change.

    ``W += lora_scaling * sum(left @ right)``, computed in float32 and rounded once to the weight's dtype. The first
    write to a weight keeps a CPU copy of its original value, so `delta_state` is the exact total change.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self._original: dict[str, torch.Tensor] = {}
        self._weights: dict[str, torch.nn.Parameter] = {}

    def add(self, delta: BaseDelta) -> None:
        for module_name, pairs in delta.items():
            layer = self.model.get_submodule(module_name)
            if not hasattr(layer, "get_base_layer") or not hasattr(layer, "scaling"):
                raise ValueError(f"base-weight write: {module_name!r} is not a PEFT LoRA layer of the model.")
            weight = layer.get_base_layer().weight
            scaling = float(layer.scaling[layer.active_adapters[0]])
            transposed = bool(getattr(layer, "fan_in_fan_out", False))  # GPT-2 Conv1D stores d_in x d_out
            change = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            for left, right in pairs:
                product = left.to(weight.device, torch.float32) @ right.to(weight.device, torch.float32)
                change.add_(product.T if transposed else product, alpha=scaling)
            key = _plain_weight_name(module_name)
            if key not in self._original:
                self._original[key] = weight.detach().to("cpu", copy=True)
                self._weights[key] = weight
            with torch.no_grad():
                weight.copy_((weight.to(torch.float32) + change).to(weight.dtype))

    def delta_state(self) -> State:
        """Base parameter name (as in the unwrapped base model) -> total change of that weight so far, float32."""
        return {
            key: self._weights[key].detach().to("cpu", torch.float32) - original.to(torch.float32)
            for key, original in sorted(self._original.items())
        }

    def checkpoint_tensors(self) -> State:
        """Everything `restore` needs to put the base weights back exactly: their original and current values."""
        out = {}
        for key, original in self._original.items():
            out[f"original/{key}"] = original
            out[f"current/{key}"] = self._weights[key].detach().to("cpu", copy=True)
        return out

    def restore(self, tensors: State) -> None:
        """Set the written base weights to a checkpoint's values (bit for bit) and resume tracking their change."""
        for name, value in tensors.items():
            if not name.startswith("current/"):
                continue
            key = name[len("current/") :]
            module_name = "base_model.model." + key[: -len(".weight")]
            try:
                weight = self.model.get_submodule(module_name).get_base_layer().weight
            except AttributeError as err:
                raise KeyError(f"checkpoint has a base-weight change for {key!r}, which the model lacks.") from err
            with torch.no_grad():
                weight.copy_(value.to(weight.dtype))
            self._weights[key] = weight
            self._original[key] = tensors[f"original/{key}"]

    def save(self, directory: str | Path) -> Path | None:
        """Write `delta_state` as ``BASE_DELTA_FILE`` in `directory` (nothing if no weight was written)."""
        if not self._original:
            return None
        from safetensors.torch import save_file

        path = Path(directory) / BASE_DELTA_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.delta_state().items()}, str(path), metadata={"format": "pt"})
        return path


def add_base_delta(model: torch.nn.Module, delta: str | Path | State) -> torch.nn.Module:
    """Add a saved ``base_delta.safetensors`` (or its state dict) to `model`'s weights, in place; returns `model`.

    Use it on the base model before loading the adapter saved next to the file, e.g.
    ``PeftModel.from_pretrained(add_base_delta(base, "out/final/base_delta.safetensors"), "out/final")``.
    A PEFT-wrapped model works too.
    """
    if not isinstance(delta, dict):
        from safetensors.torch import load_file

        delta = aligned_state(load_file(str(delta)))
    params = dict(model.named_parameters())
    for name, change in delta.items():
        candidates = [name, name[: -len(".weight")] + ".base_layer.weight", "base_model.model." + name]
        candidates.append("base_model.model." + candidates[1])
        target = next((params[c] for c in candidates if c in params), None)
        if target is None:
            raise KeyError(f"add_base_delta: the model has no weight {name!r} (nor a PEFT-wrapped one).")
        if tuple(target.shape) != tuple(change.shape):
            raise ValueError(
                f"add_base_delta: {name!r} has shape {tuple(change.shape)}, the model's is {tuple(target.shape)}."
            )
        with torch.no_grad():
            target.copy_((target.to(torch.float32) + change.to(target.device, torch.float32)).to(target.dtype))
    return model
