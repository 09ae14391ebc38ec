"""Shared fixtures: the bundled model entry and a tiny model trained and exported per session."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUNDLED_REPOSITORY = ROOT / "model_repository"
BUNDLED_ENTRY = BUNDLED_REPOSITORY / "g2p-bahdanau" / "1"

TINY_MODEL = dict(embed_size=16, encoder_size=32, decoder_size=64, attention_size=32)


def bundled_entry(name: str) -> Path:
    """The folder of a bundled model's highest version (the one the service serves by default)."""
    from attnserve.core.versions import latest

    return latest(BUNDLED_REPOSITORY, name)


@pytest.fixture(scope="session")
def bundled_manifest():
    """The bundled G2P model's manifest (checksums verified)."""
    from attnserve.core.manifest import Manifest

    return Manifest.load(BUNDLED_ENTRY)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A small Bahdanau model trained for one short epoch on real CMUdict words."""
    from attnserve.models.tasks import task
    from attnserve.models.train import TrainConfig, train

    out = tmp_path_factory.mktemp("tiny-train")
    cfg = TrainConfig(epochs=1, batch_size=64, max_train_examples=1500, max_eval_examples=150)
    return train(out, task("g2p"), "bahdanau-gru", TINY_MODEL, cfg)


@pytest.fixture(scope="session")
def tiny_entry(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny model exported into its own model repository."""
    from attnserve.export.pipeline import ExportConfig, export_model

    repo = tmp_path_factory.mktemp("tiny-repo")
    return export_model(ExportConfig(tiny_checkpoint, repo, "tiny-g2p", eval_limit=200))


@pytest.fixture(scope="session")
def tiny_transformer_entry(tmp_path_factory) -> Path:
    """A small Transformer trained for one short epoch on real CMUdict words and exported."""
    from attnserve.export.pipeline import ExportConfig, export_model
    from attnserve.models.tasks import task
    from attnserve.models.train import TrainConfig, train

    out = tmp_path_factory.mktemp("tiny-transformer")
    config = dict(d_model=32, heads=2, encoder_layers=2, decoder_layers=2, ff_size=64)
    cfg = TrainConfig(epochs=1, batch_size=64, max_train_examples=1000, max_eval_examples=100, threads=1)
    checkpoint = train(out, task("g2p"), "transformer", config, cfg)
    return export_model(ExportConfig(checkpoint, out / "repo", "tiny-transformer", eval_limit=100))


BYOM_TEXT = ROOT / "examples" / "byom" / "names-en-fr.tsv"
BYOM_IMAGES = ROOT / "examples" / "byom" / "fashion-scenes" / "captions.tsv"


@pytest.fixture(scope="session")
def tiny_subword_entry(tmp_path_factory) -> Path:
    """A small Transformer on the shipped EN->FR names with a 500-piece SentencePiece tokenizer,
    trained for one epoch and exported with its tokenizer."""
    from attnserve.export.pipeline import ExportConfig, export_model
    from attnserve.models.tasks import task
    from attnserve.models.train import TrainConfig, train

    out = tmp_path_factory.mktemp("tiny-subwords")
    config = dict(d_model=32, heads=2, encoder_layers=1, decoder_layers=1, ff_size=64)
    cfg = TrainConfig(epochs=1, batch_size=32, threads=1)
    the_task = task("parallel-text", path=BYOM_TEXT, tokens="subwords", vocab_size=500)
    checkpoint = train(out, the_task, "transformer", config, cfg)
    return export_model(ExportConfig(checkpoint, out / "repo", "tiny-subwords"))


_RSS_GROWTH: list[tuple[float, str]] = []  # (MiB the test runner grew during a test, the test)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Records how much the test runner's own memory grew during each test."""
    import psutil

    process = psutil.Process()
    before = process.memory_info().rss
    yield
    _RSS_GROWTH.append(((process.memory_info().rss - before) / 2**20, item.nodeid))


def pytest_terminal_summary(terminalreporter):
    """The tests the runner grew most in, and its size at the end (a leak shows in CI's tail)."""
    import psutil

    top = sorted(_RSS_GROWTH, reverse=True)[:3]
    rss = psutil.Process().memory_info().rss / 2**20
    grown = "; ".join(f"{mib:+.0f} MiB {nodeid}" for mib, nodeid in top)
    terminalreporter.write_line(f"test runner memory: {rss:.0f} MiB at the end; grew most in: {grown}")
