"""Model commands: train (a task, or a bundled model's --recipe), export, quantize, eval.

Training and export import torch lazily, inside their handlers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_RUN = Path("runs/model")


def _train(args: argparse.Namespace) -> int:
    from attnserve.models.tasks import task
    from attnserve.models.train import TrainConfig, train

    if args.recipe:
        return _train_recipe(args)
    given = dict(path=args.data, tokens=args.tokens, vocab_size=args.vocab_size, held_out=args.held_out,
                 image_size=args.image_size)  # fmt: skip
    task_args = {k: v for k, v in given.items() if v is not None}
    if args.task in ("parallel-text", "image-captions") and not args.data:
        print(f"error: --task {args.task} trains on your own data; pass --data FILE.tsv", file=sys.stderr)
        return 2
    try:
        the_task = task(args.task, **task_args)
    except TypeError:
        options = ", ".join(f"--{k.replace('_', '-')}" for k in task_args)
        print(f"error: task {args.task!r} does not take {options}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cfg = TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup, seed=args.seed,
        threads=args.threads, max_train_examples=args.max_train_examples,
        max_eval_examples=args.max_eval_examples, init_from=_start(args.init_from, args.out, the_task),
    )  # fmt: skip
    train(args.out, the_task, args.architecture, dict(args.set), cfg)
    return 0


def _train_recipe(args: argparse.Namespace) -> int:
    """Trains a bundled model with the settings recorded in models/recipes.yaml."""
    from importlib import resources

    import yaml

    from attnserve.models.tasks import task
    from attnserve.models.train import TrainConfig, train

    recipes = yaml.safe_load(resources.files("attnserve.models").joinpath("recipes.yaml").read_text("utf-8"))
    if args.recipe not in recipes:
        print(f"error: no recipe {args.recipe!r}; recipes: {', '.join(recipes)}", file=sys.stderr)
        return 2
    recipe = recipes[args.recipe]
    out = args.out if args.out != DEFAULT_RUN else Path("runs") / args.recipe
    task_args = recipe.get("task_args", {})
    the_task = task(recipe["task"], **task_args)
    stages = recipe["train"]
    if args.stage:
        if not 1 <= args.stage <= len(stages):
            print(f"error: recipe {args.recipe!r} has stages 1 to {len(stages)}", file=sys.stderr)
            return 2
        stages = [
            {**stages[args.stage - 1], "init_from": args.init_from or stages[args.stage - 1].get("init_from")}
        ]
        if not stages[0]["init_from"] and args.stage > 1:
            print(
                f"error: stage {args.stage} continues from stage {args.stage - 1}; pass --init-from",
                file=sys.stderr,
            )
            return 2
    checkpoint = None
    for stage in stages:
        settings = dict(stage)
        stage_args = settings.pop("task_args", None)  # a stage may change how its task draws examples
        stage_task = task(recipe["task"], **{**task_args, **stage_args}) if stage_args else the_task
        entry = settings.pop("init_from", None) or ""  # the stage's own start, if not the stage before
        start = str(checkpoint) if checkpoint else _start(entry, out, stage_task)
        cfg = TrainConfig(**settings, init_from=start)
        checkpoint = train(out, stage_task, recipe["architecture"], recipe["model"], cfg)
    return 0


def _start(init_from: str, out: Path, the_task) -> str:
    """The checkpoint to continue from: init_from itself, or for a model-repository entry, its
    model rebuilt from the graphs (checked against them), its BatchNorms (folded into the graphs'
    convolutions) given the task's statistics again, and saved in the run's folder."""
    if not init_from or not Path(init_from, "manifest.json").is_file():
        return init_from
    from attnserve.export.pipeline import checkpoint_from_entry
    from attnserve.models.batchnorm_stats import recalibrate_checkpoint

    path = checkpoint_from_entry(Path(init_from), out / "rebuilt-entry.pt")
    recalibrate_checkpoint(path, the_task)
    return str(path)


def _key_value(text: str) -> tuple[str, object]:
    """`name=value` with the value parsed as JSON where it is JSON (numbers), else a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected name=value, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _export(args: argparse.Namespace) -> int:
    from attnserve.core.manifest import ManifestError
    from attnserve.export.from_entry import read_entry
    from attnserve.export.pipeline import ExportConfig, export_model

    if (args.checkpoint is None) == (args.from_entry is None):
        print("error: export takes a checkpoint or --from-entry DIR", file=sys.stderr)
        return 2
    source, name, version, repository = args.checkpoint, args.name, args.version, args.repository
    try:
        if args.from_entry:
            source = args.from_entry
            raw = read_entry(source)
            name, version = name or raw["name"], version or str(raw["version"])
            repository = repository or source.resolve().parent.parent
        entry = export_model(
            ExportConfig(
                source,
                repository or Path("model_repository"),
                name or "g2p-bahdanau",
                version or "1",
                force=args.force,
                eval_limit=args.eval_limit,
                from_entry=bool(args.from_entry),
                int8=not args.no_int8,
            )
        )
    except (FileExistsError, ManifestError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(entry)
    return 0


def _quantize(args: argparse.Namespace) -> int:
    from attnserve.export.quantize import add_int8_variant

    variant = add_int8_variant(args.entry, args.eval_limit, progress=True)
    verdict = "qualifies for precision auto" if variant["qualifies"] else "does not qualify for auto"
    print(f"{args.entry}: int8 {variant['metrics']}, quality loss {variant['quality_loss']} ({verdict})")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from attnserve.core.manifest import Manifest
    from attnserve.core.onnx_model import OnnxSeq2Seq
    from attnserve.models.tasks import task

    manifest = Manifest.load(args.entry)
    model, the_task = OnnxSeq2Seq(manifest), task(manifest.task, **manifest.raw.get("task_args", {}))
    decoding = f"beam {args.beam}" if args.beam > 1 else "greedy"
    for split in args.split or the_task.eval_splits:
        got = the_task.evaluate_model(
            model, split, manifest.source_vocab, manifest.target_vocab, args.limit, progress=True,
            beam_size=args.beam,
        )  # fmt: skip
        recorded = manifest.metrics.get(split, {})
        print(f"{manifest.name} v{manifest.version} on {split} ({decoding})")
        for key, value in got.items():
            note = f"  (manifest: {recorded[key]:.4f})" if key in recorded else ""
            print(f"  {key} {value:.4f}{note}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Adds train, export, quantize and eval to the `attnserve` subparsers."""
    p = sub.add_parser("train", help="train a model family on a task (needs the train extra)")
    p.add_argument(
        "--task", default="g2p", help="g2p, dates, caption; parallel-text or image-captions (your own data)"
    )
    p.add_argument("--data", help="your own data: a TSV of source<TAB>target or image-file<TAB>caption lines")
    p.add_argument("--tokens", choices=("chars", "words", "subwords"), help="parallel-text: how to read text")
    p.add_argument("--vocab-size", type=int, help="parallel-text with subwords: pieces (default 8000)")
    p.add_argument("--held-out", type=int, help="your own data: pairs each for dev and test (default 5%%)")
    p.add_argument("--image-size", type=int, help="image-captions: model input side in pixels (default 56)")
    p.add_argument(
        "--architecture", default="bahdanau-gru", help="bahdanau-gru, luong-gru, transformer, captioner-lstm"
    )
    p.add_argument("--recipe", help="train a bundled model as recorded in models/recipes.yaml")
    p.add_argument("--stage", type=int, default=0, help="--recipe: only this stage (1-based), from its "
                   "recorded init_from or --init-from")  # fmt: skip
    p.add_argument("--out", type=Path, default=DEFAULT_RUN, help="default runs/<recipe> for --recipe")
    p.add_argument("--set", type=_key_value, action="append", default=[], metavar="NAME=VALUE",
                   help="a model config field, e.g. --set hidden_size=256 --set score=dot")  # fmt: skip
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=float, default=0.1, help="fraction of steps warming up")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-train-examples", type=int, default=0, help="0 = all; small for a smoke run")
    p.add_argument("--max-eval-examples", type=int, default=0, help="0 = whole dev/test splits")
    p.add_argument(
        "--init-from",
        default="",
        help="continue from a checkpoint of the same model config, "
        "or from a model-repository entry's weights (e.g. model_repository/g2p-bahdanau/1)",
    )
    p.set_defaults(handler=_train)

    p = sub.add_parser("export", help="export a checkpoint into the model repository")
    p.add_argument("checkpoint", type=Path, nargs="?")
    p.add_argument(
        "--from-entry",
        type=Path,
        metavar="DIR",
        help="instead of a checkpoint: re-export the "
        "weights of this repository entry in the current format (default: in place, with --force)",
    )
    p.add_argument("--repository", type=Path, help="default model_repository (--from-entry: the entry's)")
    p.add_argument("--name", help="default g2p-bahdanau (--from-entry: the entry's)")
    p.add_argument("--version", help="default 1 (--from-entry: the entry's)")
    p.add_argument("--force", action="store_true", help="replace an existing entry")
    p.add_argument(
        "--eval-limit", type=int, default=0, help="evaluate on the first N test examples (0 = all)"
    )
    p.add_argument("--no-int8", action="store_true", help="skip the int8 variant (see attnserve quantize)")
    p.set_defaults(handler=_export)

    p = sub.add_parser(
        "quantize", help="add a dynamically quantised int8 variant to an entry, quality measured"
    )
    p.add_argument("entry", type=Path, help="e.g. model_repository/g2p-bahdanau/1")
    p.add_argument("--eval-limit", type=int, default=0, help="evaluate on the first N examples (0 = all)")
    p.set_defaults(handler=_quantize)

    p = sub.add_parser("eval", help="evaluate a repository entry through the serving runtime")
    p.add_argument("entry", type=Path, help="e.g. model_repository/g2p-bahdanau/1")
    p.add_argument("--split", action="append", help="dev, test, ... (default: the task's test splits)")
    p.add_argument("--limit", type=int, default=0)
    p.add_argument("--beam", type=int, default=1, help="beam size (1 = greedy, what the manifest records)")
    p.set_defaults(handler=_eval)
