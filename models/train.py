"""Trains the Bahdanau G2P model on CMUdict and writes a checkpoint with its evaluation report."""

from __future__ import annotations

import json
import logging
import math
import platform
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from attnserve.models.bahdanau import BahdanauConfig, BahdanauSeq2Seq
from attnserve.models.checkpoint import load_checkpoint, save_checkpoint
from attnserve.models.evaluate import evaluate_g2p
from attnserve.models.g2p_data import load_split
from attnserve.models.torch_runner import TorchBahdanauRunner
from attnserve.service.runtime.decoding import pad_batch
from attnserve.service.vocab import Vocab

log = logging.getLogger(__name__)
MAX_OUTPUT_TOKENS = 32


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings, stored in the checkpoint beside the model config."""

    epochs: int = 20
    batch_size: int = 128
    lr: float = 3e-3
    label_smoothing: float = 0.1
    clip_norm: float = 1.0
    seed: int = 0
    threads: int = 2
    max_train_words: int = 0  # 0 = all; a small number gives a quick smoke run


def _batches(pairs, batch_size: int, rng: random.Random):
    """Shuffled batches of (src ids, tgt ids) pairs, bucketed by length to cut padding."""
    order = list(range(len(pairs)))
    rng.shuffle(order)
    pool = batch_size * 50
    batches = []
    for start in range(0, len(order), pool):
        chunk = sorted(order[start : start + pool], key=lambda i: len(pairs[i][0]))
        batches += [chunk[b : b + batch_size] for b in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return [[pairs[i] for i in batch] for batch in batches]


def _cpu_name() -> str:
    """The CPU model from /proc/cpuinfo where there is one."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def _tensors(batch, bos: int, eos: int):
    """(src_ids, src_mask, tgt_in, tgt_out) tensors for one batch."""
    src_ids, src_mask = pad_batch([s for s, _ in batch])
    tgt_in, _ = pad_batch([[bos, *t] for _, t in batch])
    tgt_out, _ = pad_batch([[*t, eos] for _, t in batch])
    return (
        torch.from_numpy(src_ids),
        torch.from_numpy(src_mask),
        torch.from_numpy(tgt_in),
        torch.from_numpy(tgt_out),
    )


def train_g2p(out_dir: Path, model_config: dict, cfg: TrainConfig) -> Path:
    """Trains, keeps the checkpoint with the best dev WER, evaluates it on test; returns its path."""
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    rng = random.Random(cfg.seed)
    train, dev, test = load_split("train"), load_split("dev"), load_split("test")
    if cfg.max_train_words:
        train = train[: cfg.max_train_words]
        dev, test = dev[: cfg.max_train_words // 10 + 1], test[: cfg.max_train_words // 10 + 1]
    src_vocab = Vocab.build(e.word for e in train + dev + test)
    tgt_vocab = Vocab.build(p for e in train for p in e.pronunciations)
    pairs = [(src_vocab.encode(list(e.word)), tgt_vocab.encode(p)) for e in train for p in e.pronunciations]
    log.info("train %d words (%d pairs), dev %d, test %d", len(train), len(pairs), len(dev), len(test))

    model = BahdanauSeq2Seq(BahdanauConfig(len(src_vocab), len(tgt_vocab), **model_config))
    log.info("model: %s, %.2fM parameters", model.config, sum(p.numel() for p in model.parameters()) / 1e6)
    optim = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    steps = cfg.epochs * len(_batches(pairs, cfg.batch_size, random.Random(0)))  # same count every epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(optim, max_lr=cfg.lr, total_steps=steps, pct_start=0.1)
    loss_fn = nn.CrossEntropyLoss(ignore_index=tgt_vocab.pad_id, label_smoothing=cfg.label_smoothing)
    best_path, best_wer, history, started = out_dir / "checkpoint.pt", math.inf, [], time.time()

    for epoch in range(1, cfg.epochs + 1):
        model.train()
        bar = tqdm(_batches(pairs, cfg.batch_size, rng), desc=f"epoch {epoch}/{cfg.epochs}", unit="batch")
        for batch in bar:
            src_ids, src_mask, tgt_in, tgt_out = _tensors(batch, tgt_vocab.bos_id, tgt_vocab.eos_id)
            logits = model(src_ids, src_mask, tgt_in)  # (B, T, V)
            loss = loss_fn(logits.reshape(-1, logits.size(-1)), tgt_out.reshape(-1))
            optim.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_norm)
            optim.step()
            sched.step()
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{sched.get_last_lr()[0]:.2e}")
        dev_metrics = evaluate_g2p(TorchBahdanauRunner(model), dev, src_vocab, tgt_vocab, MAX_OUTPUT_TOKENS)
        history.append({"epoch": epoch, "seconds": round(time.time() - started, 1), **dev_metrics})
        log.info(
            "epoch %d dev WER %.2f%% PER %.2f%%", epoch, 100 * dev_metrics["wer"], 100 * dev_metrics["per"]
        )
        if dev_metrics["wer"] < best_wer:
            best_wer = dev_metrics["wer"]
            save_checkpoint(
                best_path,
                "bahdanau-gru",
                model,
                src_vocab,
                tgt_vocab,
                task="g2p",
                train_config=asdict(cfg),
                dev_metrics=dev_metrics,
                epoch=epoch,
            )

    model, src_vocab, tgt_vocab, payload = load_checkpoint(best_path)
    test_metrics = evaluate_g2p(TorchBahdanauRunner(model), test, src_vocab, tgt_vocab, MAX_OUTPUT_TOKENS)
    training = {
        "seconds": round(time.time() - started, 1),
        "hardware": f"{_cpu_name()}, {cfg.threads} threads, torch {torch.__version__}",
        "best_epoch": payload["meta"]["epoch"],
        "history": history,
    }
    save_checkpoint(
        best_path,
        "bahdanau-gru",
        model,
        src_vocab,
        tgt_vocab,
        **payload["meta"],
        test_metrics=test_metrics,
        training=training,
    )
    report = {"dev": payload["meta"]["dev_metrics"], "test": test_metrics, "training": training}
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    log.info(
        "test WER %.2f%% PER %.2f%% (%.0f words); report in %s",
        100 * test_metrics["wer"],
        100 * test_metrics["per"],
        test_metrics["words"],
        out_dir / "report.json",
    )
    return best_path
