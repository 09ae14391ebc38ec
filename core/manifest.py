"""The model-repository manifest: what a served model is, its graphs, vocabularies and figures.

Layout: <repository>/<model name>/<version>/{manifest.json, encoder.onnx, decoder_step.onnx} plus
the files the manifest's `files` lists (a subword tokenizer), each with its sha256.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attnserve.core.subwords import MODEL_FILE, TOKENIZERS
from attnserve.core.text_forms import TEXT_FORMS
from attnserve.core.vocab import Vocab

FORMAT_REVISION = 2
MANIFEST_FILE = "manifest.json"
# Revision 2 changed only the Transformer's graphs (per-layer caches the decode loop appends to);
# revision-1 entries of the other families load unchanged.
READABLE_REVISIONS = {1: ("bahdanau-gru", "luong-gru", "captioner-lstm"), 2: None}
REEXPORT_COMMAND = "attnserve export --from-entry"


class ManifestError(ValueError):
    """A model-repository entry is missing, malformed or does not match its files."""


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, element type and shape (ints or axis names)."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]


@dataclass(frozen=True)
class GraphSpec:
    """One ONNX file with its checksum and declared inputs and outputs."""

    file: str
    sha256: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


@dataclass(frozen=True)
class DecoderSpec:
    """How the decode loop wires the decoder step.

    initial_state maps each decoder input to where its first value comes from:
    "encoder:<output name>" or "input:<encoder input name>". recurrent maps a decoder output to
    the decoder input it replaces at the next step; cache maps a decoder output holding one
    position (B, ..., 1, X) to the cache input (B, ..., T, X) it is written into, at each row's
    position. position_input (optional) names the (B,) int64 input that carries each row's step
    index. step_attention and encoder_attention name the outputs holding extra attention modes
    (per layer and head, self-attention).
    """

    token_input: str
    logits_output: str
    attention_output: str
    initial_state: dict[str, str]
    recurrent: dict[str, str]
    step_attention: dict[str, str] = field(default_factory=dict)  # mode -> decoder output
    encoder_attention: dict[str, str] = field(default_factory=dict)  # mode -> encoder output
    cache: dict[str, str] = field(default_factory=dict)  # one-position output -> cache input
    position_input: str = ""


@dataclass(frozen=True)
class Variant:
    """The same model at another precision (e.g. dynamically quantised int8 weights): its graphs
    (same inputs and outputs), its figures on the task's test splits, and whether its quality
    loss against float32 stays within the limit export applied (`qualifies`, used by "auto")."""

    encoder: GraphSpec
    decoder_step: GraphSpec
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    qualifies: bool = False


@dataclass(frozen=True)
class ImageSpec:
    """The input of an image model: size and channels it takes, and its attention grid."""

    height: int
    width: int
    channels: int
    grid_height: int
    grid_width: int


@dataclass(frozen=True)
class Manifest:
    """A parsed manifest.json; `path` is the folder holding it."""

    path: Path
    name: str
    version: str
    task: str
    architecture: str
    source_vocab: Vocab
    target_vocab: Vocab
    lowercase: bool  # applied after the text form
    tokenizer: str  # one of TOKENIZERS
    target_separator: str
    max_source_tokens: int
    max_output_tokens: int
    encoder: GraphSpec
    decoder_step: GraphSpec
    decoder: DecoderSpec
    attention_modes: tuple[str, ...]
    description: str = ""
    reads_locale: bool = False
    image: ImageSpec | None = None
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    text_form: str = "as-typed"  # one of core.text_forms.TEXT_FORMS
    files: dict[str, str] = field(default_factory=dict)  # file beside the graphs -> sha256
    variants: dict[str, Variant] = field(default_factory=dict)  # precision ("int8") -> its graphs
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def load(cls, folder: Path, verify_checksums: bool = True) -> Manifest:
        """Reads and validates <folder>/manifest.json.

        Raises:
            ManifestError: if the file is missing, malformed, of another format revision, or an
                ONNX or other listed file is missing or does not match its sha256.
        """
        folder = Path(folder)
        try:
            raw = json.loads((folder / MANIFEST_FILE).read_text("utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ManifestError(f"cannot read {folder / MANIFEST_FILE}: {e}") from e
        _check_revision(folder, raw)
        try:
            manifest = cls._parse(folder, raw)
        except (KeyError, TypeError, ValueError) as e:
            raise ManifestError(f"{folder / MANIFEST_FILE}: malformed ({e!r})") from e
        if verify_checksums:
            graphs = [manifest.encoder, manifest.decoder_step]
            graphs += [g for v in manifest.variants.values() for g in (v.encoder, v.decoder_step)]
            verify_files(folder, {g.file: g.sha256 for g in graphs} | manifest.files)
        return manifest

    @classmethod
    def _parse(cls, folder: Path, raw: dict[str, Any]) -> Manifest:
        """Builds the dataclasses from the JSON object."""

        def specs(items: list[dict[str, Any]]) -> tuple[TensorSpec, ...]:
            return tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in items)

        def graph(g: dict[str, Any]) -> GraphSpec:
            return GraphSpec(g["file"], g["sha256"], specs(g["inputs"]), specs(g["outputs"]))

        encoder, decoder_step = graph(raw["graphs"]["encoder"]), graph(raw["graphs"]["decoder_step"])

        def variant(v: dict[str, Any]) -> Variant:
            enc, dec = v["graphs"]["encoder"], v["graphs"]["decoder_step"]
            return Variant(
                GraphSpec(enc["file"], enc["sha256"], encoder.inputs, encoder.outputs),
                GraphSpec(dec["file"], dec["sha256"], decoder_step.inputs, decoder_step.outputs),
                v.get("metrics", {}),
                bool(v.get("qualifies", False)),
            )

        src, tgt = raw["source"], raw["target"]
        tokenizer = src.get("tokenizer", "characters")
        if tokenizer not in TOKENIZERS:
            raise ValueError(f"unknown tokenizer {tokenizer!r}; expected one of {TOKENIZERS}")
        text_form = src.get("text_form", "as-typed")
        if text_form not in TEXT_FORMS:
            raise ValueError(f"unknown text form {text_form!r}; expected one of {TEXT_FORMS}")
        files = dict(raw.get("files", {}))
        if any(Path(name).name != name for name in files):
            raise ValueError("files must name files in the entry's own folder")
        if tokenizer == "sentencepiece" and MODEL_FILE not in files:
            raise ValueError(f"a sentencepiece model needs its tokenizer {MODEL_FILE} listed in files")
        image = None
        if src.get("kind") == "image":
            grid = src["grid"]
            image = ImageSpec(
                int(src["height"]), int(src["width"]), int(src["channels"]), int(grid[0]), int(grid[1])
            )
        return cls(
            path=folder,
            name=raw["name"],
            version=str(raw["version"]),
            task=raw["task"],
            architecture=raw["architecture"],
            source_vocab=Vocab(tuple(src["vocab"])),
            target_vocab=Vocab(tuple(tgt["vocab"])),
            lowercase=bool(src.get("lowercase", False)),
            tokenizer=tokenizer,
            target_separator=tgt.get("separator", " "),
            max_source_tokens=int(src["max_tokens"]),
            max_output_tokens=int(tgt["max_tokens"]),
            encoder=encoder,
            decoder_step=decoder_step,
            decoder=DecoderSpec(**raw["decoder"]),
            attention_modes=tuple(raw.get("attention_modes", ())),
            description=raw.get("description", ""),
            reads_locale=bool(src.get("locale_token", False)),
            image=image,
            metrics=raw.get("metrics", {}),
            text_form=text_form,
            files=files,
            variants={name: variant(v) for name, v in raw.get("variants", {}).items()},
            raw=raw,
        )


def _check_revision(folder: Path, raw: dict[str, Any]) -> None:
    """Raises ManifestError unless this attnserve reads the entry's format revision for its family."""
    revision = raw.get("format_revision")
    if revision not in READABLE_REVISIONS:
        raise ManifestError(
            f"{folder}: manifest format revision {revision!r}, this attnserve reads revisions "
            f"{sorted(READABLE_REVISIONS)} (latest {FORMAT_REVISION})"
        )
    families = READABLE_REVISIONS[revision]
    if families is not None and raw.get("architecture") not in families:
        raise ManifestError(
            f"{folder}: a {raw.get('architecture')} entry of manifest format revision {revision} has "
            f"graphs this attnserve no longer runs (revision {FORMAT_REVISION} changed them); re-export "
            f"it from its own weights: {REEXPORT_COMMAND} {folder} --force"
        )


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_files(folder: Path, sha256s: Mapping[str, str]) -> None:
    """Checks that every file named (file name in folder -> hex sha256) is there with that sha256.

    Raises:
        ManifestError: for the first file missing or not matching.
    """
    for name, expected in sha256s.items():
        actual = sha256_of(folder / name) if (folder / name).is_file() else "missing"
        if actual != expected:
            raise ManifestError(f"{folder / name}: sha256 {actual} != manifest {expected}")


def discover(repository: Path) -> list[Manifest]:
    """Latest version (highest number) of every model in a repository, sorted by name.

    Raises:
        ManifestError: if the repository does not exist or an entry is invalid.
    """
    repository = Path(repository)
    if not repository.is_dir():
        raise ManifestError(f"model repository {repository} does not exist")
    found = []
    for model_dir in sorted(p for p in repository.iterdir() if p.is_dir()):
        versions = [v for v in model_dir.iterdir() if v.is_dir() and v.name.isdigit()]
        if versions:
            found.append(Manifest.load(max(versions, key=lambda v: int(v.name))))
    return found
