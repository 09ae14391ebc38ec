"""DDTP pairing (on entries in the indexes' own format) and the shipped snapshot."""

from __future__ import annotations

import lzma

from attnserve.models.ddtp_data import parse_translations, unique_pairs
from attnserve.models.tasks.parallel_text import read_pairs
from tests.conftest import ROOT

SNAPSHOT = ROOT / "models" / "data" / "ddtp-en-fr.tsv.xz"

ENGLISH = """Package: libfoo-dev
Description-md5: 0001
Description-en: development files for libfoo
 This package contains the headers. It also ships the static library.
 .
 Install it to build against libfoo.

Package: bar
Description-md5: 0002
Description-en: bar utility
 Bar does one thing.
 .
 It does it well.

Package: only-english
Description-md5: 0003
Description-en: not translated
"""

FRENCH = """Package: libfoo-dev
Description-md5: 0001
Description-fr: fichiers de développement pour libfoo
 Ce paquet contient les en-têtes. Il fournit aussi la
 bibliothèque statique.
 .
 Installez-le pour compiler avec libfoo.

Package: bar
Description-md5: 0002
Description-fr: utilitaire bar
 Bar fait une chose, et la fait bien.
"""


def test_descriptions_pair_by_md5_and_sentences_pair_only_where_they_line_up():
    pairs = unique_pairs(parse_translations(ENGLISH, "en"), parse_translations(FRENCH, "fr"))
    assert pairs == [
        ("development files for libfoo", "fichiers de développement pour libfoo"),
        ("This package contains the headers.", "Ce paquet contient les en-têtes."),
        ("It also ships the static library.", "Il fournit aussi la bibliothèque statique."),
        ("Install it to build against libfoo.", "Installez-le pour compiler avec libfoo."),
        ("bar utility", "utilitaire bar"),  # 2 English paragraphs, 1 French: no sentence pairs
    ]


def test_the_snapshot_records_its_provenance_and_holds_clean_unique_pairs():
    with lzma.open(SNAPSHOT, "rt", encoding="utf-8") as f:
        header = [line for line in f.read(4000).splitlines() if line.startswith("#")]
    assert any("Release Date:" in line for line in header)
    assert sum("sha256" in line for line in header) == 2
    stated = int(next(line for line in header if line.startswith("# written")).split("; ")[1].split()[0])
    pairs = read_pairs(SNAPSHOT)
    assert sum(len(targets) for targets in pairs.values()) == stated > 60_000
    assert all(s == " ".join(s.split()) for s in pairs)  # whitespace normalised
