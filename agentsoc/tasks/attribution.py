"""Whose answer is it? Finds the parts of a response that restate another agent's answer.

In rounds >= 1 a critic reads the other agents' answers (or a summary of them) and often repeats
them before giving its own: "Agent 2's answer is 310, I get 312". A parser that trusts the strongest
cue anywhere votes the quoted 310. The numeric and MMLU parsers ask :func:`quoted_spans` where such
restatements lie and take their evidence from outside them.

A restatement starts at a marker that names another party as the owner of what follows:

- a label opening a line or sentence: ``Agent 1: ...``, ``**Solution 2:** ...``;
- another party's answer, by possessive: ``agent 2's answer``, ``the other agents' results``,
  ``their answer``;
- another party as the subject of a reporting verb: ``Agent 2 says``, ``both agents got``,
  ``the summary states``, ``one agent chose``;
- an attribution phrase: ``according to agent 2``, ``in agent 3's solution``, ``for agent 1,``.

It runs to the end of its sentence and stops early where the agent speaks for itself again: at a
first-person word ("I", "my", "we"), at a contrast ("but", "however", "whereas"), or at a comma that
opens a statement of its own ("..., the correct answer is"). An attribution phrase is normally
followed by a comma, so its span runs over that first comma. Agent names ("Agent 2") are spans of
their own wherever they appear: the 2 in "I agree with Agent 2." is nobody's answer.

Bare pronouns ("they say", "he gets") and a bare "the agent" are deliberately not markers: GSM8K and
MMLU questions are full of people and of agents (real-estate, oxidizing) who are not debaters.
"""

from __future__ import annotations

import bisect
import re

#: numbered agents: "agent 2", "Agent #3", "agents 1 and 3", "agent 1 and agent 3" (not the 78 of "agent 1 and 78")
_NAMED = (
    r"(?:agents\s*(?:#\s*)?\d+(?:\s*(?:,|and|&|or)\s*(?:#\s*)?\d+)*"
    r"|agent\s*(?:#\s*)?\d+(?:\s*(?:,|and|&|or)\s*agents?\s*(?:#\s*)?\d+)*)"
)
#: a debater: "agent 2", "agents 1 and 3", "Agent B", "one agent", "two of the other agents", "solution 2",
#: "the previous solution" (not "the first solution", a GSM8K mixture as often as a debater)
_PARTY = (
    r"\b(?:" + _NAMED + r"|agents?\s*(?:one|two|three|four|five|(?-i:[A-HJ-Z])\b)"
    r"|(?:one|another|other|each|both|all|every|two|three|first|second|third|fourth|fifth|last|previous|remaining)"
    r"\s+(?:of\s+the\s+)?(?:\w+\s+)?agents?"
    r"|agents|others"
    r"|(?:solution|response|opinion)s?\s*(?:#\s*)?\d+"
    r"|(?:the\s+)?(?:other|another|previous)\s+(?:two\s+|three\s+)?(?:solution|response|opinion)s?"
    r")\b"
)
#: a debater or the summary of them; the summary is left out of labels and "in ..." phrases, where
#: "Summary:" and "In summary, ..." are the agent's own words
_PARTY_OR_SUMMARY = r"(?:" + _PARTY + r"|\b(?:the\s+)?summary\b)"
#: what a debater owns: "agent 2's *answer*", "their final *choice*"
_NOUN = (
    r"(?:answer|result|solution|response|value|number|choice|option|calculation|reasoning|conclusion|opinion|"
    r"view|total|work|computation)s?\b"
)
_APOSTROPHE_S = r"(?:'s|’s|s'|s’|')"
_FIRST_PERSON = r"(?:(?-i:I)(?:'m|'ve|'d|'ll|’m|’ve|’d|’ll)?|my|me|mine|myself|we|our|us)\b"
_CONTRAST = r"(?:but|however|whereas|while|although|though|yet|instead|nevertheless|nonetheless)\b"
_VERB = (
    r"(?:say|says|said|stat(?:e|es|ed)|claim(?:s|ed)?|g(?:ot|ets?)|f(?:ind|inds|ound)|conclud(?:e|es|ed)"
    r"|calculat(?:e|es|ed)|comput(?:e|es|ed)|believ(?:e|es|ed)|thinks?|thought|argu(?:e|es|ed)|suggest(?:s|ed)?"
    r"|arriv(?:e|es|ed)\s+at|ch(?:ose|ooses?)|pick(?:s|ed)?|select(?:s|ed)?|answer(?:s|ed)|(?:went|go|goes)\s+with"
    r"|g(?:ive|ives|ave)|propos(?:e|es|ed)|report(?:s|ed)?|obtain(?:s|ed)?|reach(?:es|ed)?|determin(?:e|es|ed)"
    r"|agree(?:s|d)?|vot(?:e|es|ed)|c(?:ame|omes?)\s+up\s+with|provid(?:e|es|ed)|wr(?:ote|ites?)|ha(?:s|ve|d)"
    r"|end(?:s|ed)?\s+up\s+with|mention(?:s|ed)?)\b"
)
#: up to four words between a debater and its verb ("Agent 2, on the other hand, says"), none of them "I", "but"
#: or "and" ("He gives 3 to others and has 5 left": the others have nothing)
_GAP = r"(?:(?:\s*,\s*|\s+)(?!" + _FIRST_PERSON + "|" + _CONTRAST + r"|and\b|or\b)[\w'’-]+){0,4}?(?:\s*,\s*|\s+)"

#: a label opening a line or sentence: "Agent 1: ...", "- **Agent 2's answer**: ...", "Solution 3: ..."
_LABEL = re.compile(
    r"(?:^|(?<=[.!?]\s))[ \t>*_#-]*(?:\d+[.)]\s*)?[*_]*"
    r"(?:" + _PARTY + r"|(?:one\s+)?agent(?:\s+(?:response|solution))?)[*_]*\s*"
    r"(?:" + _APOSTROPHE_S + r"\s+(?:[\w-]+\s+)?" + _NOUN + r")?[*_]*\s*:",
    re.IGNORECASE | re.MULTILINE,
)
#: inside a sentence: a possessive ("agent 2's answer", "their answer", "Agent 2's \boxed{20}") or a debater as
#: the subject of a reporting verb ("Agent 2 says", "both agents, on the other hand, got")
_MARKER = re.compile(
    r"(?:" + _PARTY_OR_SUMMARY + r"|\bother)" + _APOSTROPHE_S
    + r"(?:\s+(?:[\w-]+\s+){0,2}?" + _NOUN + r"|\s*\$?\s*\\(?:boxed|fbox)\b)"
    + r"|\b(?:their|his|her)\s+(?:[\w-]+\s+)?(?:answer|solution|response|choice|opinion|conclusion|reasoning)s?\b"
    + r"|" + _PARTY_OR_SUMMARY + _GAP + _VERB,
    re.IGNORECASE,
)  # fmt: skip
#: an attribution phrase, usually followed by a comma that does not end it ("According to agent 2, the answer
#: is 310"); "in/per/for" only where they open a sentence or clause, or "I looked for the other agents'
#: answers, and ..." would be one
_PHRASE = re.compile(
    r"\baccording\s+to\s+(?:the\s+)?(?:" + _PARTY_OR_SUMMARY + r"|them)"
    + r"|(?:^|(?<=[.!?,;:]\s))[*_]*(?:in|per|for)\s+(?:the\s+)?" + _PARTY
    + r"(?:" + _APOSTROPHE_S + r"\s+(?:[\w-]+\s+)?" + _NOUN + r")?",
    re.IGNORECASE | re.MULTILINE,
)  # fmt: skip
#: an attribution after the fact: "330 for agent 1 and 78 for agent 2", "the answer of agent 2 is 310"
_AFTER = re.compile(r"\b(?:for|from|by|of)\s+(?:the\s+)?" + _PARTY + r"|\(\s*" + _PARTY + r"\s*\)", re.IGNORECASE)
#: where a clause that ends in an after-the-fact attribution begins
_CLAUSE_START = re.compile(
    r"[.!?](?=\s)|[,;:\n]|\b(?:and|unlike|than|not|vs|versus)\b|\b" + _FIRST_PERSON + r"|\b" + _CONTRAST,
    re.IGNORECASE,
)
#: an agent's name: never an answer, wherever it stands
_NAME = re.compile(r"\b" + _NAMED + r"\b", re.IGNORECASE)
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)|[;\n]")
#: where the agent speaks for itself again: a sentence's end, "I"/"my", "but", or a comma that opens an own
#: statement ("..., the correct answer is", "..., so the answer", "..., therefore")
_OWN_AGAIN = re.compile(
    _SENTENCE_END.pattern + r"|\b" + _FIRST_PERSON + r"|\b" + _CONTRAST
    + r"|,\s*(?:and\s+)?(?:thus|therefore|hence|so\s+the|the\s+(?:correct|right|final|actual|true|real)\b"
    + r"|the\s+(?:answer|result)\b)",
    re.IGNORECASE,
)  # fmt: skip


def name_spans(text: str) -> list[range]:
    """Character ranges of ``text`` that name an agent ("Agent 2", "agents 1 and 3"), sorted and disjoint."""
    return [range(m.start(), m.end()) for m in _NAME.finditer(text)]


def quoted_spans(text: str) -> list[range]:
    """Character ranges of ``text`` that restate another agent's answer or name an agent, sorted and disjoint."""
    # every boundary is found once, and looked up by bisection: a long response stays linear, not quadratic
    sentence_ends = [m.start() for m in _SENTENCE_END.finditer(text)]
    own_again = [m.start() for m in _OWN_AGAIN.finditer(text)]
    clause_starts = [m.end() for m in _CLAUSE_START.finditer(text)]

    def next_of(positions: list[int], start: int) -> int:
        i = bisect.bisect_left(positions, start)
        return positions[i] if i < len(positions) else len(text)

    spans = name_spans(text)
    for label in _LABEL.finditer(text):
        # a quote may speak in the first person ("Agent 1: I think 310"): only the sentence's end closes it
        spans.append(range(label.start(), next_of(sentence_ends, label.end())))
    for marker in _MARKER.finditer(text):
        spans.append(range(marker.start(), next_of(own_again, marker.end())))
    for phrase in _PHRASE.finditer(text):
        comma = text.find(",", phrase.end(), next_of(sentence_ends, phrase.end()))
        spans.append(range(phrase.start(), next_of(own_again, comma + 1 if comma >= 0 else phrase.end())))
    for after in _AFTER.finditer(text):
        i = bisect.bisect_right(clause_starts, after.start())
        spans.append(range(clause_starts[i - 1] if i else 0, next_of(own_again, after.end())))
    return _merged(spans)


def within(spans: list[range], position: int) -> bool:
    """Whether ``position`` lies in one of ``spans`` (sorted and disjoint, as the functions above return them)."""
    i = bisect.bisect_right(spans, position, key=lambda span: span.start)
    return i > 0 and position in spans[i - 1]


def _merged(spans: list[range]) -> list[range]:
    merged: list[range] = []
    for span in sorted(spans, key=lambda span: span.start):
        if merged and span.start <= merged[-1].stop:
            merged[-1] = range(merged[-1].start, max(merged[-1].stop, span.stop))
        elif span:
            merged.append(span)
    return merged
