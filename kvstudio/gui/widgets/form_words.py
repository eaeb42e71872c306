"""Validation messages in a form's own words.

The core's checks speak the CLI's language ("--recent 200 is larger than --budget 128"): right in a
terminal, foreign in a form whose fields are labelled "recent" and "budget". The forms pass their
messages through `in_form_words` with their labels; the core and the CLI keep their wording.
"""

from __future__ import annotations

import re

OPTION = re.compile(r"--([a-z][a-z0-9-]*)(?: N\b)?")  # "--budget", and "--budget N" as in "needs --budget N"


def in_form_words(message: str, labels: dict[str, str]) -> str:
    """'--recent 200 is larger than --budget 128' -> 'Recent 200 is larger than budget 128'.

    `labels` maps an option's name ('recent', 'group-size') to the form's label for that field;
    an option the form does not show keeps its name, spelled as words."""
    def label(match: re.Match) -> str:
        name = match.group(1)
        return labels.get(name, name.replace("-", " "))

    text = OPTION.sub(label, message)
    return text[:1].upper() + text[1:] if OPTION.match(message) else text  # a sentence starting with a label
