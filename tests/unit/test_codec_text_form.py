"""The bundled date model reads what people type for one date as one text, and manifests name
their text form."""

import json
import shutil

import pytest

from attnserve.core.manifest import Manifest, ManifestError
from attnserve.core.model_runner import ModelRunner
from attnserve.core.requests import AttentionMode
from tests.conftest import bundled_entry

TYPED_ALIKE = [  # (locale, ways of typing one date)
    (
        "en_US",
        ["March 7, 2024", "MARCH 7, 2024", "march 7, 2024", "Ｍarch ７, ２０２４", " march\u00a07, 2024 "],
    ),
    ("ar_EG", ["7 مارس 2024", "٧ مارس ٢٠٢٤"]),
    ("fr_FR", ["1er mars 2024", "1ᵉʳ MARS 2024"]),
]


@pytest.mark.parametrize(("locale", "texts"), TYPED_ALIKE)
def test_case_widths_digits_and_spaces_read_as_one_source(locale, texts):
    codec = ModelRunner(Manifest.load(bundled_entry("dates-luong"))).codec
    sources = {codec.prepare(t, AttentionMode.NONE, locale=locale).source_ids for t in texts}
    assert len(sources) == 1


def test_an_unknown_text_form_is_refused_by_name(tmp_path):
    folder = tmp_path / "dates" / "1"
    shutil.copytree(bundled_entry("dates-luong"), folder)
    raw = json.loads((folder / "manifest.json").read_text())
    raw["source"]["text_form"] = "nfd"
    (folder / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match="unknown text form 'nfd'"):
        Manifest.load(folder)
