"""Communication per client per round of the full-parameter family (fedfft, fedkrso, fedkseed, ferret), measured by
encoding real messages through the client and server roles and the wire codec (no model is loaded); with --memory, the
client memory of a real local phase of each method, on MiniLM (sequence classification) and Gemma-3-270M.

Local training is simulated by what it leaves behind: FedFFT a small random change of every trained weight; FedKRSO
random out x r accumulators for the seeds the client would use (drawn exactly as `KRSOAdamW` draws them: one seed
per tau local steps, uniformly from the round's K); FedKSeed one random scalar per local step, on the seed index its
optimizer would pick. One transformer block is encoded and the bytes are scaled to all blocks (equal shapes); the
classification head, if the preset has one, is added once. FedKSeed's messages do not depend on the model.

    python benchmarks/full_parameter.py --preset roberta-base      # the FedKRSO authors' setting, 100 local steps
    python benchmarks/full_parameter.py --preset tiny --local-steps 8
    python benchmarks/full_parameter.py --preset minilm --json
    python benchmarks/full_parameter.py --preset minilm --memory --json          # + measured memory (minutes)
    python benchmarks/full_parameter.py --preset minilm --memory --quick         # a few local steps per method

Memory (`--memory`): each (model, method) runs one real local phase (`FederatedTrainer.local_train`, batch
`--memory-batch` of `--memory-length` tokens) in a process of its own, so nothing of one method stays resident for
the next. Counted from the tensors themselves: the optimizer's state (every tensor in `optimizer.state`: Adam's
moments and step counts), the gradients at their largest (before an optimizer step: every `.grad` of the model and
of the method's own parameters), the method's extra tensors (FedKRSO: coordinates, projections and per-seed
accumulators; FedKSeed: its per-seed scalars; FedAvg-LoRA: the adapter; Ferret: none, its local phase is plain SGD
without momentum, and its projection onto the bases comes after the phase) and the float32 copy of the initial trained
weights that the full-parameter family keeps (every party rebuilds the global model from it). From the operating
system: the resident set before the local phase and its peak during it (Linux ``VmHWM``, reset through
``/proc/self/clear_refs`` before the phase). FedAvg-LoRA on the classifier trains the adapter plus the new head
(PEFT's sequence-classification task type). The result is also stored in benchmarks/results/full_parameter/
memory.json (read by benchmarks/full_parameter_accuracy.py).

`benchmarks/comm_table.py` calls `measure` for these algorithms on its Llama shapes. MB = 1024^2 bytes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _memory import peak_rss_mb, reset_peak, rss_mb  # noqa: E402

from fedsrd import FedSRDConfig, get_algorithm  # noqa: E402
from fedsrd.algorithms import get_algorithm_class
from fedsrd.algorithms.fedkrso import accumulator_name
from fedsrd.algorithms.fedkseed import LOCAL_INCREMENT
from fedsrd.client import FederatedClient
from fedsrd.ops import generator_for
from fedsrd.server import FederatedServer
from fedsrd.wire import MB

ALGORITHMS = ["fedfft", "fedkrso", "fedkseed", "ferret"]  # ferret: issue 19 (newalgos)


def _bert(hidden: int, intermediate: int, layers: int, head: dict[str, tuple[int, ...]]) -> dict:
    block = [
        ("attention.self.query", hidden, hidden),
        ("attention.self.key", hidden, hidden),
        ("attention.self.value", hidden, hidden),
        ("attention.output.dense", hidden, hidden),
        ("intermediate.dense", intermediate, hidden),
        ("output.dense", hidden, intermediate),
    ]
    return {"prefix": "encoder.layer", "block": block, "layers": layers, "head": head}


PRESETS = {
    # the FedKRSO authors' model: RoBERTa-base, 2 classes; head classifier.dense + classifier.out_proj
    "roberta-base": _bert(
        768,
        3072,
        12,
        {
            "classifier.dense.weight": (768, 768),
            "classifier.dense.bias": (768,),
            "classifier.out_proj.weight": (2, 768),
            "classifier.out_proj.bias": (2,),
        },
    ),
    # the packaged all-MiniLM-L6-v2 as BertForSequenceClassification: pooler + classifier
    "minilm": _bert(
        384,
        1536,
        6,
        {
            "bert.pooler.dense.weight": (384, 384),
            "bert.pooler.dense.bias": (384,),
            "classifier.weight": (2, 384),
            "classifier.bias": (2,),
        },
    ),
    # the tests' tiny random Llama (fedsrd.models.build_tiny_llama): no head (lm_head stays frozen)
    "tiny": {
        "prefix": "model.layers",
        "block": [
            ("self_attn.q_proj", 64, 64),
            ("self_attn.k_proj", 32, 64),
            ("self_attn.v_proj", 32, 64),
            ("self_attn.o_proj", 64, 64),
            ("mlp.gate_proj", 128, 64),
            ("mlp.up_proj", 128, 64),
            ("mlp.down_proj", 64, 128),
        ],
        "layers": 2,
        "head": {},
    },
}


def simulated_local_state(algo, start: dict, shapes: dict, round: int, client_id: int, seed: int) -> dict:
    """What a client's local phase leaves for `client_update`, drawn as that algorithm's optimizer would draw."""
    cfg = algo.config
    gen = generator_for(seed, "bench_local", round, client_id)
    if algo.name == "fedkseed":
        picker = generator_for(cfg.seed, "fedkseed_pick", round, client_id)
        increments = torch.zeros(cfg.kseed_num_seeds)
        for _ in range(cfg.local_steps):
            increments[int(torch.randint(cfg.kseed_num_seeds, (1,), generator=picker))] += 1e-6 * float(
                torch.randn(1, generator=gen)
            )
        return {LOCAL_INCREMENT: increments}
    # the local phase moves each weight a little from where this round starts (not from zero: Ferret projects the
    # change, so a local state drawn around zero would send the whole global state as the change from round 2 on)
    local = {name: (start[name] if name in start else 0.0) + 1e-4 * torch.randn(shape, generator=gen)
             for name, shape in shapes.items()}  # fmt: skip
    if algo.name == "fedkrso":
        picker = generator_for(cfg.seed, "fedkrso_pick", round, client_id)
        periods = math.ceil(cfg.local_steps / cfg.krso_tau)
        used = {int(torch.randint(cfg.krso_num_seeds, (1,), generator=picker)) for _ in range(periods)}
        for name, shape in shapes.items():
            if len(shape) == 2 and name in start and not _is_head(name, algo):
                for k in used:
                    local[accumulator_name(name, k)] = 1e-4 * torch.randn(shape[0], cfg.krso_rank, generator=gen)
    return local


def _is_head(name: str, algo) -> bool:
    return algo.trainable(name) if algo.name == "fedkrso" else False


def measure(
    name: str,
    block: list[tuple[str, int, int]],
    head: dict[str, tuple[int, ...]] | None = None,
    *,
    total_layers: float,
    clients: int = 4,
    rounds: int = 2,
    local_steps: int = 10,
    seed: int = 0,
    value_dtype: str = "float32",
    positions: str = "auto",
) -> dict:
    """Mean MB per client per round of `name`: one block (`block`: weight name, d_out, d_in) encoded and scaled by
    `total_layers`, plus the head's tensors once (a message of their own: one container header more)."""
    cfg = FedSRDConfig(
        algorithm=name,
        num_clients=clients,
        fed_seed=seed,
        value_dtype=value_dtype,
        positions=positions,
        local_steps=local_steps,
    )
    parts = [({n: (d_out, d_in) for n, d_out, d_in in block}, total_layers)]
    if head and name != "fedkseed":
        parts.append((dict(head), 1.0))
    if name == "fedkseed":  # the K scalars do not depend on the model: one measurement, not scaled
        parts = [(parts[0][0], 1.0)]
    upload = [0.0] * rounds
    download = [0.0] * rounds
    for shapes, scale in parts:
        algo = get_algorithm(name, cfg)
        state = algo.init_global_state({n: torch.zeros(s) for n, s in shapes.items()})
        server = FederatedServer(algo, dict(state), cfg)
        view = FederatedClient(algo, dict(state), cfg)
        for round in range(1, rounds + 1):
            blobs = []
            for cid in range(clients):
                local = simulated_local_state(algo, view.state, shapes, round, cid, seed)
                blobs.append(view.make_update(local, round=round, client_id=cid, num_samples=1))
            result = server.step(round, blobs, min_updates=clients)
            view.receive(result.broadcast)
            upload[round - 1] += scale * statistics.fmean(len(b) for b in blobs) / MB
            download[round - 1] += scale * len(result.broadcast) / MB
    cls = get_algorithm_class(name)
    return {
        "algorithm": name,
        "paper": cls.paper,
        "uploads": cls.uploads,
        "downloads": cls.downloads,
        "upload_mb": statistics.fmean(upload),
        "download_mb": statistics.fmean(download),
        "total_mb": statistics.fmean(upload) + statistics.fmean(download),
        "upload_mb_by_round": upload,
        "download_mb_by_round": download,
    }


# ---- memory of a real local phase ---------------------------------------------------------------------------------
MEMORY_MODELS = ["minilm", "gemma-3-270m"]
CLASSIFIERS = {"minilm": "all-minilm-l6-v2", "tiny-bert": "tiny-bert"}  # the others load as causal LMs (tiny-llama)
MEMORY_METHODS = ["fedkrso", "fedfft", "fedkseed", "fedavg", "ferret"]  # ferret: plain SGD, no optimizer state
MEMORY_RESULT = Path(__file__).resolve().parent / "results" / "full_parameter" / "memory.json"
MEMORY_KEYS = ("optimizer_state_mb", "gradients_mb", "extra_tensors_mb", "initial_copy_mb", "rss_before_mb",
               "peak_rss_mb")  # fmt: skip


def _tensor_mb(tensors) -> float:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor)) / MB


def _memory_rows(classifier: bool, rows: int):
    """Rows long enough to fill `--memory-length` tokens: a sentence and a label, or an instruction and an answer."""
    from datasets import Dataset

    words = ["the film", "a moving", "dull and", "story", "brilliant", "acting", "plot", "never", "quite", "works"]
    rng = random.Random(0)
    texts = [" ".join(rng.choice(words) for _ in range(80)) for _ in range(rows)]
    if classifier:
        return Dataset.from_list([{"sentence": t, "label": i % 2} for i, t in enumerate(texts)])
    return Dataset.from_list([{"instruction": t[:200], "input": "", "output": t} for t in texts])


def _method_extra_tensors(trainer) -> list[torch.Tensor]:
    """The method's own tensors beside the model and the optimizer's state."""
    opt = trainer.fed_optimizer
    if opt is not None and hasattr(opt, "coordinates"):  # FedKRSO
        accumulators = [a for by_name in opt.accumulators.values() for a in by_name.values()]
        return [*opt.coordinates.values(), *opt.projections.values(), *accumulators]
    if opt is not None and hasattr(opt, "increments"):  # FedKSeed
        return [opt.increments]
    if trainer.algorithm.uses_lora:  # the adapter (and a classifier's trained head copy)
        return [p for p in trainer.model.parameters() if p.requires_grad]
    return []


def memory_worker(model_name: str, method: str, steps: int, batch: int, length: int) -> dict:
    """One local phase of `method` on `model_name` in this process; the bytes it held (see the module docstring)."""
    import tempfile

    from transformers import TrainerCallback, TrainingArguments

    from fedsrd.models import load_causal_lm, load_sequence_classifier
    from fedsrd.trainer import FederatedTrainer

    classifier = model_name in CLASSIFIERS
    if classifier:
        model, tokenizer = load_sequence_classifier(CLASSIFIERS[model_name])
    else:
        model, tokenizer = load_causal_lm(model_name, dtype="float32")
    cfg = FedSRDConfig(algorithm=method, num_clients=1, num_rounds=1, local_steps=steps)
    if classifier and get_algorithm_class(method).uses_lora:
        from peft import get_peft_model

        targets = ["query", "key", "value", "dense"]  # every block Linear (and BERT's pooler), as the family
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model = get_peft_model(model, cfg.to_lora_config(task_type="SEQ_CLS", target_modules=targets))
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="fedsrd_memory_"), per_device_train_batch_size=batch, learning_rate=1e-5,
        lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0, use_cpu=True, report_to="none",
        disable_tqdm=True, logging_steps=10_000, save_strategy="no",
    )  # fmt: skip
    trainer = FederatedTrainer(model=model, args=args, fed_config=cfg, client_datasets=[_memory_rows(classifier, 64)],
                               processing_class=tokenizer, max_length=length)  # fmt: skip
    seen = dict.fromkeys(("optimizer_state_mb", "gradients_mb", "extra_tensors_mb"), 0.0)

    class Probe(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            extra = getattr(trainer.fed_optimizer, "extra_parameters", lambda: [])()
            grads = [p.grad for p in [*trainer.model.parameters(), *extra] if p.grad is not None]
            seen["gradients_mb"] = max(seen["gradients_mb"], _tensor_mb(grads))

        def on_step_end(self, args, state, control, **kwargs):
            opt = trainer.fed_optimizer or getattr(trainer.optimizer, "optimizer", trainer.optimizer)
            state_tensors = [t for per_param in opt.state.values() for t in per_param.values()]
            seen["optimizer_state_mb"] = max(seen["optimizer_state_mb"], _tensor_mb(state_tensors))
            seen["extra_tensors_mb"] = max(seen["extra_tensors_mb"], _tensor_mb(_method_extra_tensors(trainer)))

    trainer.add_callback(Probe())
    rss_before = rss_mb()
    reset = reset_peak()
    trainer.local_train(0, 1)
    peak = peak_rss_mb() if reset else None
    return {
        **seen,
        "initial_copy_mb": _tensor_mb(trainer.initial_weights.values()),
        "rss_before_mb": rss_before,
        "peak_rss_mb": peak,
        "trained_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "steps": steps,
    }


def measure_memory(models: list[str], methods: list[str], steps: int, batch: int, length: int) -> dict:
    """{model: {method: memory_worker's result}}, each (model, method) in a fresh process."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_TELEMETRY": "1"}  # fmt: skip
    result: dict[str, dict[str, dict]] = {}
    for model in models:
        for method in methods:
            sizes = ["--memory-steps", str(steps), "--memory-batch", str(batch), "--memory-length", str(length)]
            cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-worker", f"{model}:{method}", *sizes]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            lines = proc.stdout.strip().splitlines()
            if proc.returncode != 0 or not lines:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
                result.setdefault(model, {})[method] = {"error": f"exit {proc.returncode}: {tail[0]}"}
                continue
            result.setdefault(model, {})[method] = json.loads(lines[-1])
            print(f"memory {model} {method}: {result[model][method]}", file=sys.stderr, flush=True)
    return result


PHASE_KEYS = ("memory_steps", "memory_batch", "memory_length")  # what makes two measurements comparable


def store_memory(memory: dict, config: dict, path: Path = MEMORY_RESULT) -> dict:
    """Write the measured rows to `path` (read by full_parameter_accuracy.py), keeping the stored rows of the other
    (model, method) pairs when they were measured with the same phase (`PHASE_KEYS`), so one method can be measured
    and added on its own (``--memory-methods ferret``). Returns what was written."""
    merged: dict[str, dict] = {}
    if path.is_file():
        old = json.loads(path.read_text())
        if all(old.get("config", {}).get(k) == config.get(k) for k in PHASE_KEYS):
            merged = old.get("memory", {})
    for model, rows in memory.items():
        merged.setdefault(model, {}).update(rows)
    methods = list(dict.fromkeys(m for rows in merged.values() for m in rows))
    stored = {"config": {**config, "memory_models": list(merged), "memory_methods": methods}, "memory": merged}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(stored, indent=1))
    return stored


def memory_table(memory: dict) -> str:
    head = ["model", "method", "optimizer state MB", "gradients MB", "method's extra tensors MB",
            "initial-weights copy MB", "RSS before MB", "peak RSS of the local phase MB",
            "params autograd trains"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for model, by_method in memory.items():
        for method, m in by_method.items():
            if "error" in m:
                lines.append(f"| {model} | `{method}` | " + m["error"] + " |" * (len(head) - 2))
                continue
            cells = [f"{m[k]:.2f}" if m.get(k) is not None else "-" for k in MEMORY_KEYS]
            lines.append(f"| {model} | `{method}` | " + " | ".join(cells) + f" | {m['trained_params']:,} |")
    for model, by_method in memory.items():
        krso, fft = by_method.get("fedkrso", {}), by_method.get("fedfft", {})
        if krso.get("optimizer_state_mb") is not None and fft.get("optimizer_state_mb"):
            share = 100 * krso["optimizer_state_mb"] / fft["optimizer_state_mb"]
            lines.append(f"\n{model}: FedKRSO's optimizer state is {share:.2f}% of FedFFT's.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="roberta-base")
    p.add_argument("--clients", type=int, default=10, help="Clients, all taking part every round (FedKRSO: 10).")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--local-steps", type=int, default=100, help="Local steps per round (FedKRSO's code: 100).")
    p.add_argument("--algorithms", nargs="+", default=ALGORITHMS)
    p.add_argument("--value-dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="Also print one JSON object as the last line.")
    p.add_argument("--memory", action="store_true", help="Also measure a real local phase's memory (minutes).")
    p.add_argument("--quick", action="store_true", help="With --memory: a few local steps per method (3).")
    models = [*MEMORY_MODELS, "tiny-bert", "tiny-llama"]  # the tiny ones: tests
    p.add_argument("--memory-models", nargs="+", default=MEMORY_MODELS, choices=models)
    p.add_argument("--memory-methods", nargs="+", default=MEMORY_METHODS, choices=MEMORY_METHODS)
    p.add_argument("--memory-steps", type=int, default=10, help="Local steps of the measured phase.")
    p.add_argument("--memory-batch", type=int, default=8)
    p.add_argument("--memory-length", type=int, default=64, help="Tokens per example (rows are long enough).")
    p.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)  # MODEL:METHOD, in a process of its own
    args = p.parse_args(argv)
    if args.memory_worker is not None:
        model_name, _, method = args.memory_worker.partition(":")
        row = memory_worker(model_name, method, args.memory_steps, args.memory_batch, args.memory_length)
        print(json.dumps(row))
        return row
    if args.quick:
        args.memory_steps = 3
    preset = PRESETS[args.preset]
    block = [(f"{preset['prefix']}.0.{m}.weight", d_out, d_in) for m, d_out, d_in in preset["block"]]
    rows = [
        measure(
            name,
            block,
            preset["head"],
            total_layers=preset["layers"],
            clients=args.clients,
            rounds=args.rounds,
            local_steps=args.local_steps,
            seed=args.seed,
            value_dtype=args.value_dtype,
        )
        for name in args.algorithms
    ]
    defaults = FedSRDConfig()
    description = (
        f"{args.preset}: all Linear weights of {preset['layers']} blocks"
        + (" + classification head" if preset["head"] else "")
        + f"; {args.clients} clients, {args.local_steps} local steps; FedKRSO r={defaults.krso_rank}, "
        f"K={defaults.krso_num_seeds}, tau={defaults.krso_tau}; FedKSeed K={defaults.kseed_num_seeds}; "
        f"Ferret K={defaults.ferret_num_seeds}; "
        f"{args.value_dtype}; MB (1024^2 B) per client per round, mean of {args.rounds} rounds."
    )
    print(f"Configuration: {description}\n")
    print("| algorithm | client uploads | server broadcasts | up MB | down MB |")
    print("|---|---|---|---:|---:|")
    for r in rows:
        mb = [f"{r['upload_mb']:.4f}", f"{r['download_mb']:.4f}"]
        cells = [f"`{r['algorithm']}`", r["uploads"], r["downloads"], *mb]
        print("| " + " | ".join(cells) + " |")
    result = {"config": {**vars(args), "description": description}, "rows": rows}
    if args.memory:
        memory = measure_memory(
            args.memory_models, args.memory_methods, args.memory_steps, args.memory_batch, args.memory_length
        )
        print(f"\nMemory of one local phase ({args.memory_steps} steps of batch {args.memory_batch} x "
              f"{args.memory_length} tokens, fp32, CPU), each method in its own process; MB = 1024^2 B:\n")  # fmt: skip
        print(memory_table(memory))
        result["memory"] = memory
        store_memory(memory, {k: v for k, v in vars(args).items() if "memory" in k})
    if args.json:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
