"""Split articles into sentences with character offsets (pySBD's rule-based segmenter)."""

import re
from dataclasses import dataclass
from functools import lru_cache

import pysbd


@dataclass(frozen=True)
class Sentence:
    text: str
    start: int
    end: int


@lru_cache(maxsize=1)
def _segmenter() -> pysbd.Segmenter:
    return pysbd.Segmenter(language="en", clean=False, char_span=True)


def split_sentences(document: str) -> list[Sentence]:
    """Sentences with `document[start:end] == text`.

    Line breaks end a sentence first (headlines, datelines and paragraphs rarely end with a
    full stop); pySBD then handles abbreviations, decimals and quotes inside each paragraph.
    """
    sentences = []
    for paragraph in re.finditer(r"[^\n]+", document):
        offset = paragraph.start()
        for span in _segmenter().segment(paragraph.group()):
            raw = paragraph.group()[span.start : span.end]
            stripped = raw.strip()
            if not stripped:
                continue
            start = offset + span.start + (len(raw) - len(raw.lstrip()))
            sentences.append(Sentence(stripped, start, start + len(stripped)))
    return sentences
