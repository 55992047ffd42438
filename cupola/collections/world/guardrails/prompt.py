"""Pre-generation prompt check: a lemmatised keyword blocklist.

A prompt is refused when it contains a blocklisted term in any inflected form:

    text --NFKC, casefold, drop format chars (zero-width spaces)--> words ([^\\W_]+)
         --each word: {word, lemma(word), lemma(unaccented word)}, accents stripped--> keys
    a one-word entry matches a word whose keys meet the entry's keys ("kill" ~ "killed", "KILLS",
    "ｋｉｌｌｉｎｇ", "kílling"; never "skill": words are matched whole);
    a phrase entry matches as many adjacent words, in any order ("child abuse" ~ "abused children");
    runs of three or more single letters are also read joined ("k i l l", "k.i.l.l" ~ "kill").

Lemmas come from ``simplemma`` (pure Python, bundled dictionaries, nothing downloaded). This is a
first, transparent filter — it does not understand paraphrase, leetspeak or intent; it catches the
obvious and tells the user exactly which term tripped it and how to change the list.
"""

from __future__ import annotations

import itertools
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import simplemma

from cupola.toolkit.config import ConfigError, config_error

__all__ = [
    "DEFAULT_BLOCKLIST",
    "PromptGuard",
    "PromptGuardConfig",
    "PromptMatch",
    "PromptRefused",
    "PromptVerdict",
    "load_terms",
]

DEFAULT_BLOCKLIST = Path(__file__).with_name("blocklist.txt")

_WORD = re.compile(r"[^\W_]+")  # letters and digits; underscores, hyphens and punctuation split words
_MIN_SPELLED_OUT = 3  # "k i l l" is read as "kill"; two single letters ("a b") are left alone


@dataclass(kw_only=True, slots=True)
class PromptGuardConfig:
    enabled: bool = True
    # None: the shipped blocklist.txt; a str/Path: a file in the same format (one term or phrase a
    # line, '#' comments); a list: the terms themselves. Replaces the default list.
    blocklist: str | Path | list[str] | None = None
    extra_terms: list[str] = field(default_factory=list)  # added to the blocklist
    # Terms or phrases let through: a blocked match lying wholly inside an allowed one is ignored
    # (allow=["kill"] lets "killed" pass; allow=["kill switch"] lets only that phrase pass).
    allow: list[str] = field(default_factory=list)
    language: str = "en"  # simplemma language code; several: "en,de"

    @property
    def languages(self) -> tuple[str, ...]:
        return tuple(code.strip() for code in self.language.split(",") if code.strip())

    def validate(self) -> None:
        codes = self.languages
        if not codes:
            raise config_error(self, "language", self.language, "give a simplemma language code, e.g. 'en'")
        for code in codes:
            try:
                simplemma.lemmatize("test", lang=code)
            except ValueError:
                raise config_error(
                    self, "language", self.language, f"{code!r} is not a simplemma language{_supported()}"
                ) from None
        if isinstance(self.blocklist, (str, Path)) and not Path(self.blocklist).is_file():
            raise config_error(
                self,
                "blocklist",
                self.blocklist,
                "no such file (a path to a term-per-line file, a list of terms, or None for the default)",
            )


@dataclass(frozen=True, slots=True)
class PromptMatch:
    term: str  # the blocklist entry, as written there
    text: str  # the prompt's words that matched it (normalised: casefolded, NFKC)


@dataclass(frozen=True, slots=True)
class PromptVerdict:
    allowed: bool
    matches: tuple[PromptMatch, ...]
    message: str

    @property
    def terms(self) -> tuple[str, ...]:
        """The distinct blocklist entries that matched, in the order found."""
        return tuple(dict.fromkeys(m.term for m in self.matches))


class PromptRefused(ValueError):
    """A prompt matched the blocklist; the message names the terms and how to change the list."""

    def __init__(self, verdict: PromptVerdict) -> None:
        super().__init__(verdict.message)
        self.verdict = verdict


@dataclass(frozen=True, slots=True)
class _Entry:
    term: str
    words: tuple[frozenset[str], ...]  # one key set per word


@dataclass(frozen=True, slots=True)
class _Word:
    text: str
    keys: frozenset[str]


class PromptGuard:
    """Checks prompts against a lemmatised blocklist.

    >>> guard = PromptGuard(PromptGuardConfig(blocklist=["kill"]))
    >>> guard.check("A robot killing time").allowed
    False
    >>> guard.check("A skilled robot").allowed
    True
    """

    def __init__(self, config: PromptGuardConfig | None = None) -> None:
        self.config = config = config or PromptGuardConfig()
        config.validate()
        self._lang = config.languages
        if config.blocklist is None:
            terms, self.source = load_terms(DEFAULT_BLOCKLIST), f"the default blocklist {DEFAULT_BLOCKLIST}"
        elif isinstance(config.blocklist, (str, Path)):
            terms, self.source = load_terms(config.blocklist), f"the blocklist {config.blocklist}"
        else:
            terms, self.source = list(config.blocklist), "PromptGuardConfig.blocklist"
        self._blocked = self._entries([*terms, *config.extra_terms], "blocklist/extra_terms")
        self._allowed = self._entries(config.allow, "allow")

    def check(self, prompt: str) -> PromptVerdict:
        if not self.config.enabled:
            return PromptVerdict(allowed=True, matches=(), message="prompt guard disabled")
        matches: dict[PromptMatch, None] = {}
        for words in self._word_streams(prompt):
            allowed_positions = {p for _, span in _find(self._allowed, words) for p in span}
            for entry, span in _find(self._blocked, words):
                if not set(span) <= allowed_positions:
                    text = " ".join(words[p].text for p in span)
                    matches[PromptMatch(term=entry.term, text=text)] = None
        if not matches:
            return PromptVerdict(allowed=True, matches=(), message="prompt allowed")
        return PromptVerdict(allowed=False, matches=tuple(matches), message=self._refusal(tuple(matches)))

    def enforce(self, prompt: str) -> PromptVerdict:
        """``check`` that raises :class:`PromptRefused` instead of returning a refusal."""
        verdict = self.check(prompt)
        if not verdict.allowed:
            raise PromptRefused(verdict)
        return verdict

    def _refusal(self, matches: tuple[PromptMatch, ...]) -> str:
        found = ", ".join(
            f"{m.term!r}" if m.text == m.term else f"{m.term!r} (as {m.text!r})" for m in matches
        )
        terms = list(dict.fromkeys(m.term for m in matches))
        return (
            f"Prompt refused by the guardrails: it contains the blocked term(s) {found}, from {self.source}. "
            f"If this is a false positive, let the term through with PromptGuardConfig(allow={terms!r}), "
            "pass your own list with PromptGuardConfig(blocklist=<file or list>), "
            "or turn the prompt check off with PromptGuardConfig(enabled=False)."
        )

    def _entries(self, terms: Iterable[str], where: str) -> list[_Entry]:
        entries = []
        for term in terms:
            words = [self._keys(w) for w in _words(term)]
            if not words:
                raise ConfigError(f"PromptGuardConfig.{where}: {term!r} has no words to match")
            entries.append(_Entry(term=term.strip(), words=tuple(words)))
        return entries

    def _keys(self, word: str) -> frozenset[str]:
        return _keys(word, self._lang)

    def _word_streams(self, prompt: str) -> list[list[_Word]]:
        """The prompt's words, and (if it spells words out letter by letter) the same with those joined."""
        raw = _words(prompt)
        words = [_Word(w, self._keys(w)) for w in raw]
        joined: list[_Word] = []
        for single, run in itertools.groupby(raw, key=lambda w: len(w) == 1 and w.isalpha()):
            run = list(run)
            if single and len(run) >= _MIN_SPELLED_OUT:
                joined.append(_Word(" ".join(run), self._keys("".join(run))))
            else:
                joined.extend(_Word(w, self._keys(w)) for w in run)
        return [words] if len(joined) == len(words) else [words, joined]


def load_terms(path: str | Path) -> list[str]:
    """Terms from a blocklist file: one term or phrase a line; '#' starts a comment."""
    terms = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        term = line.split("#", 1)[0].strip()
        if term:
            terms.append(term)
    return terms


def _normalise(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).casefold()
    return "".join(c for c in text if unicodedata.category(c) != "Cf")  # zero-width space/joiners, BOM


def _words(text: str) -> list[str]:
    return _WORD.findall(_normalise(text))


def _strip_accents(word: str) -> str:
    return "".join(c for c in unicodedata.normalize("NFKD", word) if not unicodedata.combining(c))


@lru_cache(maxsize=65536)
def _keys(word: str, lang: tuple[str, ...]) -> frozenset[str]:
    plain = _strip_accents(word)
    lemmas = {simplemma.lemmatize(word, lang=lang), simplemma.lemmatize(plain, lang=lang)}
    return frozenset({plain} | {_strip_accents(_normalise(lemma)) for lemma in lemmas})


def _find(entries: Sequence[_Entry], words: Sequence[_Word]) -> list[tuple[_Entry, range]]:
    """Every (entry, word span) where the entry's words sit side by side in ``words``, in any order."""
    if not entries or not words:
        return []
    by_key: dict[str, set[int]] = {}
    for i, entry in enumerate(entries):
        for keys in entry.words:
            for key in keys:
                by_key.setdefault(key, set()).add(i)
    hits = [set().union(*(by_key.get(k, set()) for k in w.keys)) for w in words]  # entries each word touches
    found = []
    for start in range(len(words)):
        for i in sorted(hits[start]):
            entry = entries[i]
            span = range(start, start + len(entry.words))
            if span.stop > len(words) or any(i not in hits[p] for p in span):
                continue
            if _pairs_up([words[p].keys for p in span], entry.words):
                found.append((entry, span))
    return found


def _pairs_up(window: Sequence[frozenset[str]], entry: Sequence[frozenset[str]]) -> bool:
    """Whether each word of the window can be paired with its own entry word sharing a key."""
    owner: dict[int, int] = {}  # entry word -> window word (Kuhn's augmenting paths; phrases are short)

    def place(w: int, seen: set[int]) -> bool:
        for e in range(len(entry)):
            if e not in seen and window[w] & entry[e]:
                seen.add(e)
                if e not in owner or place(owner[e], seen):
                    owner[e] = w
                    return True
        return False

    return all(place(w, set()) for w in range(len(window)))


def _supported() -> str:
    try:
        from simplemma.strategies.dictionaries.dictionary_factory import SUPPORTED_LANGUAGES
    except ImportError:  # a simplemma layout we do not know: the error still names the bad code
        return ""
    return f"; choose from {', '.join(sorted(SUPPORTED_LANGUAGES))}"
