"""Fed-SB (Singhal et al., "Fed-SB: A Silver Bullet for Extreme Communication Efficiency and Performance in (Private)
Federated LoRA Fine-Tuning", arXiv 2502.15436, 2025; code CERT-Lab/fed-sb), on LoRA-SB (Ponkshe et al.,
"Initialization using update approximation is a silver bullet for optimal low-rank fine-tuning", arXiv 2411.19557).

LoRA-SB adapts each weight as ``W = W_0 + s B R A`` with B (d_out x r) and A (r x d_in) frozen and only the r x r
matrix R trained (LoRA-SB Sec. 3). Its initialisation approximates the first step of full fine-tuning (Sec. 3.2):

    dW_1 = -lr_1 sign(sum_x grad_W L(x))                   (the Fed-SB code's `estimate_and_process_grads_torch`)
    dW_1 ~= U_r S_r V_r^T (truncated SVD),   B = U_r,  A = V_r^T,  R = S_r / s    (`find_and_initialize_grad`)

so that the adapter starts at ``s B R A = [dW_1]_r``; lr_1 is the learning rate of the first optimizer step (the
code's ``lr / warmup_steps``). Fed-SB's observation (Sec. 3): with B and A shared and frozen, averaging R is exact,

    sum_i p_i B R_i A = B (sum_i p_i R_i) A,

so a client uploads only R (r^2 numbers per module, independent of d_out, d_in and of the number of clients) and the
server broadcasts the mean R (the code's `aggregate_models_fed_sb`).

Where R lives. PEFT has no layer for B R A. `FedSB.prepare_adapter` adds to each PEFT LoRA Linear a
``lora_R`` ModuleDict (adapter name -> ``Linear(r, r)``, weight R) and a forward hook on ``lora_A[adapter]`` that
applies R to its output, as the Fed-SB code's ``default_lora_latent_mapping`` does between lora_A and lora_B. The
adapter state dict then carries ``...lora_R.weight`` beside ``lora_A``/``lora_B``; only R is trainable
(requires_grad on ``lora_R`` alone). A saved adapter keeps R separate; `to_plain_lora` folds it into A
(``B (R A)``, exact) for a plain PEFT adapter that any PEFT loads and merges.

Initialisation data (a choice the paper leaves to the deployment; the Fed-SB code pools 170 training examples before
splitting them among clients): the gradient is summed over the first `fed_sb_init_samples` examples of client 0,
one example at a time, in eval mode (no dropout), so every party that builds the model from that data gets the same
bits. Deviations from the code: an exact SVD (``torch.linalg.svd`` in float64 on the CPU) instead of the randomised
``svd_lowrank`` in bfloat16; R is divided by the LoRA scaling s (the code sets lora_alpha = r, so s = 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from fedsrd.algorithms import register_algorithm
from fedsrd.algorithms.base import AlgorithmOptions, Payload, State, require_option
from fedsrd.algorithms.fedavg import FedAvg
from fedsrd.algorithms.fedsrd import lora_modules
from fedsrd.ops import weighted_sum

R_SUFFIX = ".lora_R.weight"


def r_key(module: str) -> str:
    """State key of module `module`'s r x r matrix R (PEFT key without the adapter name)."""
    return module + R_SUFFIX


def first_step_update(gradient_sum: torch.Tensor, lr: float) -> torch.Tensor:
    """The approximate first update of full fine-tuning, ``-lr sign(sum of gradients)`` (Adam's first step)."""
    return -lr * torch.sign(gradient_sum.to(torch.float32))


def lora_sb_factors(update: torch.Tensor, rank: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(B, A, R)`` with ``scaling * B R A`` the best rank-`rank` approximation of `update` (d_out x d_in).

    ``update = U S V^T``: B = U_r (d_out x r), A = V_r^T (r x d_in), R = S_r / scaling; float32, computed in float64.
    """
    u, s, vh = torch.linalg.svd(update.to(torch.float64), full_matrices=False)
    keep = min(rank, s.numel())
    b = torch.zeros(update.shape[0], rank, dtype=torch.float64)
    a = torch.zeros(rank, update.shape[1], dtype=torch.float64)
    r = torch.zeros(rank, rank, dtype=torch.float64)
    b[:, :keep], a[:keep], r[:keep, :keep] = u[:, :keep], vh[:keep], torch.diag(s[:keep]) / scaling
    return b.float(), a.float(), r.float()


def to_plain_lora(state: State) -> State:
    """A Fed-SB adapter state as a plain PEFT LoRA one: ``lora_A <- R A`` (so ``B (R A) = B R A``), R removed."""
    plain = {k: v for k, v in state.items() if not k.endswith(R_SUFFIX)}
    for module in lora_modules(state):
        r = state.get(r_key(module.name))
        if r is None:
            raise ValueError(f"Fed-SB: module {module.name!r} has no {R_SUFFIX.lstrip('.')!r} in the state.")
        plain[module.a_key] = r.to(torch.float32) @ state[module.a_key].to(torch.float32)
    return plain


def _lora_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    from peft.tuners.lora import Linear as LoraLinear

    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLinear)]


def base_weight_gradients(model: torch.nn.Module, data: Any, num_samples: int) -> dict[str, torch.Tensor]:
    """Sum over the first `num_samples` rows of `data` (tokenised: input_ids, labels) of the gradient of the loss with
    respect to each LoRA layer's base weight, one example at a time, in eval mode. LoRA layer name -> d_out x d_in
    float32 CPU tensor. Every parameter's requires_grad and the model's mode are restored afterwards."""
    layers = _lora_layers(model)
    if not layers:
        raise ValueError("Fed-SB: the model has no PEFT LoRA Linear layer to initialise.")
    if data is None or len(data) == 0:
        raise ValueError("Fed-SB: LoRA-SB's initialisation needs training examples (client 0's data), got none.")
    if "input_ids" not in getattr(data, "column_names", []) or "labels" not in data.column_names:
        raise ValueError("Fed-SB: the initialisation data must be tokenised (input_ids and labels columns).")
    saved = {id(p): p.requires_grad for p in model.parameters()}
    was_training = model.training
    weights = {name: layer.base_layer.weight for name, layer in layers}
    device = next(iter(weights.values())).device
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for w in weights.values():
            w.requires_grad_(True)
            w.grad = None
        model.eval()
        for i in range(min(num_samples, len(data))):
            row = data[i]
            ids = torch.tensor([row["input_ids"]], device=device)
            labels = torch.tensor([row["labels"]], device=device)
            loss = model(input_ids=ids, labels=labels).loss
            if torch.isfinite(loss):  # a row without a completion token has no loss
                loss.backward()
        grads = {}
        for name, w in weights.items():
            grad = w.grad if w.grad is not None else torch.zeros_like(w)
            grads[name] = grad.detach().to("cpu", torch.float32).clone()
            w.grad = None
        return grads
    finally:
        for p in model.parameters():
            p.requires_grad_(saved[id(p)])
        model.train(was_training)


def insert_r(layer: torch.nn.Module, adapter: str, r: torch.Tensor) -> None:
    """Give PEFT LoRA layer `layer` an r x r matrix R (``layer.lora_R[adapter]``) applied to lora_A's output."""
    rank = r.shape[0]
    lora_a = layer.lora_A[adapter]
    if not hasattr(layer, "lora_R"):
        layer.lora_R = torch.nn.ModuleDict()
    mapping = torch.nn.Linear(rank, rank, bias=False, device=lora_a.weight.device, dtype=lora_a.weight.dtype)
    with torch.no_grad():
        mapping.weight.copy_(r)
    layer.lora_R[adapter] = mapping

    def apply_r(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        weight = layer.lora_R[adapter].weight
        return F.linear(output, weight if weight.dtype == output.dtype else weight.to(output.dtype))  # R (A x)

    lora_a.register_forward_hook(apply_r)


@dataclass
class FedSBOptions(AlgorithmOptions):
    """Fed-SB: the examples LoRA-SB's initialisation is computed on."""

    fed_sb_init_samples: int = field(
        default=170,
        metadata={"help": "Fed-SB: examples (the first of client 0's data) whose summed gradient of the base weights "
                  "gives LoRA-SB's initialisation (the Fed-SB code's num_samples, 170)."},
    )

    @staticmethod
    def validate(config) -> None:
        n = config.fed_sb_init_samples
        require_option(config, n >= 1, "fed_sb_init_samples", f"must be >= 1, got {n}")


@register_algorithm
class FedSB(FedAvg):
    name = "fed_sb"
    options = FedSBOptions
    paper = "Fed-SB (Singhal et al., arXiv 2502.15436, 2025) on LoRA-SB (Ponkshe et al., arXiv 2411.19557)"
    uploads = "the r x r matrix R per module, dense (B and A frozen at LoRA-SB's initialisation)"
    downloads = "the averaged R per module, dense"
    secure_sum = True  # the step is the weighted mean of dense, equal-shape R: secure aggregation may hand it the sum
    init_from_data = True  # LoRA-SB's initialisation from client 0's examples (on Flower: sent to the other nodes)
    # robust_defences: FedAvg's. A weighted sum of dense R; B has orthonormal columns and A orthonormal rows, so
    # ||B (R_i - R) A|| = ||R_i - R||: clipping R bounds the product change exactly.

    def trainable(self, name: str) -> bool:
        return "lora_R" in name

    def prepare_adapter(self, model: torch.nn.Module, init_data: Any = None, args: Any = None) -> None:
        """LoRA-SB's initialisation (module docstring) on client 0's first `fed_sb_init_samples` examples."""
        if args is None:
            raise ValueError("Fed-SB: prepare_adapter needs the TrainingArguments (the first step's learning rate).")
        warmup = args.get_warmup_steps(self.config.local_steps)
        lr = args.learning_rate / max(warmup, 1)  # the learning rate of the first optimizer step
        grads = base_weight_gradients(model, init_data, self.config.fed_sb_init_samples)
        for name, layer in _lora_layers(model):
            for adapter in list(layer.lora_A.keys()):
                rank, scaling = layer.r[adapter], layer.scaling[adapter]
                b, a, r = lora_sb_factors(first_step_update(grads[name], lr), rank, scaling)
                with torch.no_grad():
                    layer.lora_B[adapter].weight.copy_(b)
                    layer.lora_A[adapter].weight.copy_(a)
                insert_r(layer, adapter, r)

    def init_global_state(self, adapter_state: State) -> State:
        missing = [m.name for m in lora_modules(adapter_state) if r_key(m.name) not in adapter_state]
        if missing:
            raise ValueError(
                f"Fed-SB: the adapter has no r x r matrix R for {missing[0]!r}; pass the base model (FederatedTrainer "
                "builds the adapter and inserts R with LoRA-SB's initialisation), not a PeftModel."
            )
        return super().init_global_state(adapter_state)

    def update_shapes(self, global_state: State) -> dict[str, tuple[tuple[int, ...], bool]]:
        return {k: (tuple(v.shape), False) for k, v in global_state.items() if k.endswith(R_SUFFIX)}

    def broadcast_shapes(self, global_state: State) -> dict[str, tuple[tuple[int, ...], bool]]:
        return self.update_shapes(global_state)

    def client_update(self, global_state: State, local_state: State, round: int, rng: torch.Generator) -> Payload:
        return {k: local_state[k].detach().to("cpu", torch.float32) for k in global_state if k.endswith(R_SUFFIX)}

    def server_step(
        self, global_state: State, updates: list[Payload], weights: list[float], round: int, rng: torch.Generator
    ) -> Payload:
        if not updates:
            raise ValueError("Fed-SB.server_step: no client updates to aggregate.")
        names = sorted(k for k in global_state if k.endswith(R_SUFFIX))
        return {name: weighted_sum([u[name] for u in updates], weights) for name in names}  # R = sum_i p_i R_i

    def apply(self, state: State, broadcast: Payload) -> State:
        frozen = sorted(k for k in broadcast if not k.endswith(R_SUFFIX))
        if frozen:
            raise ValueError(f"Fed-SB.apply: the broadcast carries {frozen[0]!r}; only R may change.")
        return super().apply(state, broadcast)
