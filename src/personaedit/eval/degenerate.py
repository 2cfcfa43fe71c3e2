"""Is a text scorable at all? Degenerate text (empty, a few words, repetition loops, gibberish) gets no trait score.

The text judge reads personality from wording; a reply that is empty, two words long, a loop
("I'd LOVE to do a free-LEM-LEM-LEM-LEM…") or token soup from a broken model carries no such wording, yet a
linear head on sentence features still returns a confident number for it (gibberish from a random model
read openness +0.93). `assess(text)` measures five cheap, model-free properties of the text and calls it
unscorable when any crosses its threshold:

- **empty**: no letter at all.
- **too short**: fewer than `MIN_WORDS` words (a word: a run of letters, with inner apostrophes).
- **loop**: a stretch of 1-40 characters repeated at least four times in a row covers at least
  `MAX_LOOP_SHARE` of the text's non-space characters ("LEM-LEM-LEM-LEM", "hahahaha", a sentence said four
  times over).
- **repetition**: texts of at least `REPEAT_MIN_WORDS` words whose share of word 3-grams already seen
  earlier in the text is at least `MAX_REPEATED_TRIGRAMS` (loops with variation, or not back to back),
  or whose distinct-word ratio is below `MIN_DISTINCT_RATIO`.
- **gibberish**: texts of at least `GIBBERISH_MIN_WORDS` words with under `MIN_FUNCTION_SHARE` of their
  words from `FUNCTION_WORDS` (a short list of English function words written for this module: articles,
  pronouns, prepositions, auxiliaries, conjunctions), or of at least `GIBBERISH_MIN_WORDS`
  whitespace-separated chunks with under `MIN_WORDLIKE_SHARE` of them shaped like words or numbers (no
  symbols, no capital glued after a small letter as in "EmbedBackend"). Running English text, whatever its topic, is about half
  function words; token soup decoded from random token ids has almost none (most of its chunks are pieces
  glued together: "hepatitisapter", "thrillьMER"). Text that is not English is reported unscorable too:
  the judge is trained on English only.

The thresholds were set on data, not tuned on the judge's test split (docs/MEASUREMENT.md, "Unscorable
text"; `python benchmarks/judge_specificity.py --degenerate` prints the numbers): none of the project's
own written texts (all resource files, including judge_check) is flagged, while random token soup and
synthetic loops are.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

MIN_WORDS = 4
MAX_LOOP_SHARE = 0.2
REPEAT_MIN_WORDS = 12
MAX_REPEATED_TRIGRAMS = 0.35
MIN_DISTINCT_RATIO = 0.3
GIBBERISH_MIN_WORDS = 8
MIN_FUNCTION_SHARE = 0.1
MIN_WORDLIKE_SHARE = 0.6

# English function words (closed classes), lower case; contractions are listed whole.
FUNCTION_WORDS = frozenset("""
a an the this that these those some any no every each either neither both all few many much more most
other another such what which who whom whose whatever whichever whoever
i me my mine myself we us our ours ourselves you your yours yourself yourselves he him his himself she her
hers herself it its itself they them their theirs themselves one ones
i'm i've i'd i'll we're we've we'd we'll you're you've you'd you'll he's he'd he'll she's she'd she'll
it's it'd it'll they're they've they'd they'll that's there's here's what's who's let's
am is are was were be been being have has had having do does did doing done
will would shall should can could may might must ought
isn't aren't wasn't weren't haven't hasn't hadn't don't doesn't didn't won't wouldn't shan't shouldn't
can't cannot couldn't mustn't mightn't
and or but nor so yet for if then than because since while whereas although though unless until till
whether as once when whenever where wherever why how
of in on at by to from with without within into onto upon about above below over under between among
through throughout during before after around against along across behind beyond near off out up down
toward towards via per like unlike despite except inside outside till past
not no yes very too also just only even still already again ever never always often sometimes
here there now then well really quite rather almost enough perhaps maybe
""".split())

WORD = re.compile(r"[^\W\d_]+(?:['’][^\W\d_]+)*")
WORDLIKE_CHUNK = re.compile(r"^(?:[^\W\d_]+(?:['’-][^\W\d_]+)*|\d+(?:[.,:]\d+)*(?:%|st|nd|rd|th|s)?)$")
CAMEL = re.compile(r"[^\W\d_A-Z][A-Z]")  # a capital letter right after a small one: "EmbedBackend", "thrillьMER"
CHUNK_EDGES = "\"'“”‘’«»()[]{}<>*_.,;:!?…-–—/"
LOOP = re.compile(r"(.{1,40}?)\1{2,}", re.DOTALL)


@dataclass(frozen=True)
class Degeneracy:
    """What `assess` measured on one text, and whether (and why) the text is unscorable."""

    unscorable: bool
    reasons: tuple[str, ...]  # empty, too short, loop, repetition, gibberish (in that order)
    words: int
    loop_share: float
    repeated_trigrams: float
    distinct_ratio: float
    function_share: float
    wordlike_share: float
    details: dict[str, float] = field(default_factory=dict, compare=False)


def words_of(text: str) -> list[str]:
    """Lower-case words: runs of letters with inner apostrophes ("I'd" is one word, "free-LEM" two)."""
    return [w.replace("’", "'") for w in WORD.findall(text.lower())]


def loop_share(text: str) -> float:
    """Share of the non-space characters inside a stretch of 1-40 characters repeated ≥ 4 times back to back."""
    squeezed = re.sub(r"\s+", " ", text.strip())
    total = sum(not c.isspace() for c in squeezed)
    if total == 0:
        return 0.0
    # A trailing space completes a text-final unit ("Say no. Say no. Say no." is "Say no. " three times).
    covered = sum(sum(not c.isspace() for c in m.group(0)) for m in LOOP.finditer(squeezed + " "))
    return covered / total


def repeated_trigram_share(words: list[str]) -> float:
    """Share of the word 3-grams that already occurred earlier in the same text (0 for fewer than 3 words)."""
    grams = list(zip(words, words[1:], words[2:]))
    seen: set[tuple[str, str, str]] = set()
    repeats = 0
    for gram in grams:
        repeats += gram in seen
        seen.add(gram)
    return repeats / len(grams) if grams else 0.0


def wordlike_share(text: str) -> float:
    """Share of whitespace-separated chunks that, stripped of edge punctuation, look like a word or a number."""
    chunks = [c.strip(CHUNK_EDGES) for c in text.split()]
    chunks = [c for c in chunks if c]
    if not chunks:
        return 0.0
    return sum(bool(WORDLIKE_CHUNK.match(c)) and not CAMEL.search(c) for c in chunks) / len(chunks)


def assess(text: str) -> Degeneracy:
    """Measure `text` and decide whether it is unscorable; see the module docstring for the rules."""
    words = words_of(text)
    n = len(words)
    loop = loop_share(text)
    repeated = repeated_trigram_share(words)
    distinct = len(set(words)) / n if n else 0.0
    function = sum(w in FUNCTION_WORDS for w in words) / n if n else 0.0
    wordlike = wordlike_share(text)
    reasons = []
    if n == 0:
        reasons.append("empty")
    elif n < MIN_WORDS:
        reasons.append("too short")
    if loop >= MAX_LOOP_SHARE:
        reasons.append("loop")
    if n >= REPEAT_MIN_WORDS and (repeated >= MAX_REPEATED_TRIGRAMS or distinct < MIN_DISTINCT_RATIO):
        reasons.append("repetition")
    chunks = len(text.split())
    if (n >= GIBBERISH_MIN_WORDS and function < MIN_FUNCTION_SHARE) or (
            chunks >= GIBBERISH_MIN_WORDS and wordlike < MIN_WORDLIKE_SHARE):
        reasons.append("gibberish")
    return Degeneracy(bool(reasons), tuple(reasons), n, loop, repeated, distinct, function, wordlike)


def is_unscorable(text: str) -> bool:
    return assess(text).unscorable
