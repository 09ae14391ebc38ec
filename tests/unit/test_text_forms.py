"""Text forms: what people type for one thing reads as one thing, and as-typed changes nothing."""

import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st

from attnserve.core.text_forms import normalise

DIGITS = [chr(c) for c in range(0x110000) if unicodedata.category(chr(c)) == "Nd"]


@given(st.text())
def test_as_typed_changes_nothing_but_the_case_asked_for(text):
    assert normalise(text, "as-typed") == text
    assert normalise(text, "as-typed", lowercase=True) == text.lower()


@given(st.lists(st.sampled_from(DIGITS), min_size=1, max_size=12))
def test_every_decimal_digit_of_every_script_reads_as_its_ascii_digit(digits):
    folded = normalise("".join(digits), "nfkc")
    assert folded == "".join(str(unicodedata.decimal(d)) for d in digits)


@given(st.text(alphabet=st.characters(codec="utf-8")))
def test_nfkc_output_has_no_digit_outside_ascii(text):
    assert all(c.isascii() for c in normalise(text, "nfkc") if unicodedata.category(c) == "Nd")


@pytest.mark.parametrize(
    ("typed", "read"),
    [
        ("２０２４年３月７日", "2024年3月7日"),  # full-width digits
        ("٧ مارس ٢٠٢٤", "7 مارس 2024"),  # Arabic-Indic digits
        ("৭ মার্চ, ২০২৪", "7 মার্চ, 2024"),  # Bengali digits
        ("1ᵉʳ MARS 2024", "1er mars 2024"),  # superscript ordinal, any case
        ("7\u00a0mars\u202f2024", "7 mars 2024"),  # no-break spaces
        ("7 marc\u0327o", "7 març" + "o"),  # a decomposed cedilla
    ],
)
def test_nfkc_lowercased_reads_what_people_type_as_one_text(typed, read):
    assert normalise(typed, "nfkc", lowercase=True) == read


def test_an_unknown_form_is_refused():
    with pytest.raises(ValueError, match="unknown text form"):
        normalise("7 mars", "nfc")
