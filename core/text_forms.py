"""How a model's source text is normalised before tokenising, the same in training and serving.

`as-typed` leaves the text alone. `nfkc` folds what people type in several ways for one thing:
Unicode NFKC (full-width digits, no-break spaces, superscript ordinals, decomposed accents), then
every decimal digit of any script as its ASCII digit ("٧" and "৭" are "7").
"""

from __future__ import annotations

import unicodedata

TEXT_FORMS = ("as-typed", "nfkc")


def _ascii_digits(text: str) -> str:
    """Every decimal digit (Unicode category Nd) as its ASCII digit."""
    if text.isascii():
        return text
    return "".join(str(unicodedata.decimal(c)) if unicodedata.category(c) == "Nd" else c for c in text)


def normalise(text: str, form: str, lowercase: bool = False) -> str:
    """The text in a model's text form, lowercased after where the model reads lowercase.

    Raises:
        ValueError: for an unknown form.
    """
    if form == "nfkc":
        text = _ascii_digits(unicodedata.normalize("NFKC", text))
    elif form != "as-typed":
        raise ValueError(f"unknown text form {form!r}; expected one of {TEXT_FORMS}")
    return text.lower() if lowercase else text
