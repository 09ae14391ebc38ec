"""Trains any registered model family on a task and writes a checkpoint with its evaluation report."""

from __future__ import annotations

import json
import logging
import platform
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from attnserve.models.architectures import architecture
from attnserve.models.checkpoint import load_checkpoint, save_checkpoint
from attnserve.models.tasks.base import TextTask
from attnserve.models.torch_runner import TorchStepModel
from attnserve.models.vocab_carry import carry_source_vocab

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings, stored in the checkpoint beside the model config."""

    epochs: int = 20
    batch_size: int = 128
    lr: float = 3e-3
    label_smoothing: float = 0.1
    clip_norm: float = 1.0
    weight_decay: float = 1e-4
    warmup: float = 0.1  # fraction of the steps spent warming up (OneCycle)
    seed: int = 0
    threads: int = 2
    max_train_examples: int = 0  # 0 = all; a small number gives a quick smoke run
    max_eval_examples: int = 0  # 0 = the whole dev and test splits
    init_from: str = ""  # a checkpoint of the same family and vocabularies to continue from
    adam_beta2: float = 0.999
    bf16: bool = False  # bfloat16 autocast for the forward pass (faster on CPUs with AVX512-BF16/AMX)


def _cpu_name() -> str:
    """The CPU model from /proc/cpuinfo where there is one."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def _is_better(task: TextTask, value: float, best: float | None) -> bool:
    return best is None or (value < best if task.minimise else value > best)


def train(out_dir: Path, task: TextTask, arch_name: str, model_config: dict, cfg: TrainConfig) -> Path:
    """Trains, keeps the checkpoint with the best dev figure, evaluates it on the task's test splits.

    Args:
        out_dir: where checkpoint.pt and report.json go.
        task: the data and its metrics.
        arch_name: a registered model family (models/architectures.py).
        model_config: the family's config fields other than the vocabulary sizes.
        cfg: optimisation settings.

    Returns:
        The checkpoint's path.
    """
    arch = architecture(arch_name)
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    rng = random.Random(cfg.seed)
    src_vocab, tgt_vocab = task.vocabularies()
    fixed = task.model_fields()
    clash = {k: v for k, v in fixed.items() if model_config.get(k, v) != v}
    if clash:
        raise ValueError(f"the {task.name} data needs {clash}; do not set them otherwise")
    model_config = {**model_config, **fixed}
    model = arch.new_model(len(src_vocab), len(tgt_vocab), **model_config)
    positions = getattr(model.config, "max_positions", None)
    needed = max(task.max_source_tokens, task.max_output_tokens + 1)
    if positions and needed > positions:
        raise ValueError(
            f"the task allows {task.max_source_tokens} source and {task.max_output_tokens} output tokens; "
            f"set max_positions to at least {needed}"
        )
    earlier = 0.0  # training seconds of the checkpoint continued from
    if cfg.init_from:
        start, start_src, start_tgt, start_payload = load_checkpoint(Path(cfg.init_from))
        earlier = start_payload["meta"].get("training", {}).get("seconds", 0.0)
        has_source = hasattr(start.config, "src_vocab_size")  # image models read no vocabulary
        resized = replace(start.config, src_vocab_size=len(src_vocab)) if has_source else start.config
        if start_tgt != tgt_vocab or resized != model.config:
            raise ValueError(f"{cfg.init_from} has another model config or another target vocabulary")
        if start_src == src_vocab:
            model.load_state_dict(start.state_dict())
        else:
            unmatched = carry_source_vocab(start, start_src, model, src_vocab)
            log.info("source vocabulary %d -> %d tokens; %d start from the mean embedding: %s",
                     len(start_src), len(src_vocab), len(unmatched), "".join(unmatched)[:200])  # fmt: skip
        log.info("continuing from %s", cfg.init_from)
    log.info("%s on %s: %s, %.2fM parameters", arch.name, task.name, model.config,
             sum(p.numel() for p in model.parameters()) / 1e6)  # fmt: skip
    optim = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, betas=(0.9, cfg.adam_beta2), weight_decay=cfg.weight_decay
    )
    data_seed = cfg.seed * 10_000  # generated tasks draw other examples under another seed
    first = task.train_batches(
        data_seed + 1, cfg.batch_size, rng, src_vocab, tgt_vocab, cfg.max_train_examples
    )
    total = cfg.epochs * len(first) + 1
    sched = torch.optim.lr_scheduler.OneCycleLR(  # at least two warm-up steps, also in smoke runs
        optim, max_lr=cfg.lr, total_steps=total, pct_start=min(0.5, max(cfg.warmup, 2 / total))
    )
    best_path, best, history, started = out_dir / "checkpoint.pt", None, [], time.time()

    def evaluate(split: str) -> dict[str, float]:
        return task.evaluate_model(
            TorchStepModel(model, arch), split, src_vocab, tgt_vocab, cfg.max_eval_examples
        )

    for epoch in range(1, cfg.epochs + 1):
        batches = first if epoch == 1 else task.train_batches(
            data_seed + epoch, cfg.batch_size, rng, src_vocab, tgt_vocab, cfg.max_train_examples
        )  # fmt: skip
        model.train()
        bar = tqdm(batches[: len(first)], desc=f"epoch {epoch}/{cfg.epochs}", unit="batch")
        for batch in bar:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
                loss = arch.loss(
                    model, {k: torch.from_numpy(v) for k, v in batch.items()}, cfg.label_smoothing
                )
            optim.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_norm)
            optim.step()
            sched.step()
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{sched.get_last_lr()[0]:.2e}")
        dev = evaluate("dev")
        history.append({"epoch": epoch, "seconds": round(time.time() - started, 1), **dev})
        log.info("epoch %d dev %s", epoch, ", ".join(f"{k} {v:.4f}" for k, v in dev.items()))
        if _is_better(task, dev[task.primary], best):
            best = dev[task.primary]
            save_checkpoint(best_path, arch.name, model, src_vocab, tgt_vocab, task=task.name,
                            task_args=task.arguments, train_config=asdict(cfg), dev_metrics=dev,
                            epoch=epoch)  # fmt: skip

    model, src_vocab, tgt_vocab, payload = load_checkpoint(best_path)
    seconds = round(time.time() - started + earlier, 1)
    results = {split: evaluate(split) for split in task.eval_splits}
    training = {
        "seconds": seconds,
        "hardware": f"{_cpu_name()}, {cfg.threads} threads, torch {torch.__version__}",
        "best_epoch": payload["meta"]["epoch"],
        "history": history,
    }
    meta = {**payload["meta"], "test_metrics": results, "training": training}
    save_checkpoint(best_path, arch.name, model, src_vocab, tgt_vocab, **meta)
    report = {"dev": meta["dev_metrics"], **results, "training": training}
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    log.info("%s; report in %s", results, out_dir / "report.json")
    return best_path
