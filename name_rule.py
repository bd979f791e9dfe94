"""What a name may hold (a pet's, a dimension value's): the Unicode rule the server applies, and
the JSON Schema pattern the OpenAPI document states, derived from that same rule.

The rule is written with Unicode properties from the `regex` package, whose database follows
the current Unicode release (Python's own `unicodedata` is as old as the interpreter: 3.11 knows
Unicode 14.0, so a goose emoji of 15.0 is "unassigned" to it). Unassigned code points that
Unicode reserves for future emoji carry the Extended_Pictographic property already, so an emoji
newer than any database here is still taken, while other unassigned code points are refused."""

from functools import cache

import regex

# A name may hold any assigned character but controls (Cc), surrogates (Cs), private use (Co),
# the line and paragraph separators (U+2028 would split a line of the worker's report) and
# format characters (Cf: zero-width spaces, bidi controls such as U+202E), save the three that
# emoji and scripts need: the zero-width non-joiner and joiner (🐈‍⬛ is a cat, ZWJ, a black
# square) and the tag characters of subdivision flags. Unassigned code points are refused unless
# Unicode reserves them for emoji.
ALLOWED = (
    r"[[^\p{Cc}\p{Cs}\p{Co}\p{Zl}\p{Zp}\p{Cf}\p{Cn}]"
    r"[\u200c\u200d\U000E0020-\U000E007F]\p{Extended_Pictographic}]"
)
# And it needs one character a person can see: a letter, digit, punctuation mark or symbol
# (emoji are symbols), not one of the letters and symbols that render as nothing (Hangul
# fillers, the blank Braille pattern), or an emoji newer than the database.
VISIBLE = (
    r"[[[\p{L}\p{N}\p{P}\p{S}]--[\u115f\u1160\u3164\uffa0\u2800]]"
    r"[\p{Cn}&&\p{Extended_Pictographic}]]"
)
RULE = (
    "Trimmed. At least one letter, digit, punctuation mark or symbol (emoji included, with "
    "their joiners, variation selectors and keycaps); no control, format (zero-width, bidi "
    "control), private-use, surrogate, line- or paragraph-separator characters, nor code points "
    "Unicode has not assigned (except those it reserves for emoji)."
)
FORBIDDEN_MESSAGE = (
    "must not contain control characters, nor format (zero-width, bidi), private-use, "
    "unassigned or line/paragraph separator characters"
)
INVISIBLE_MESSAGE = "must contain a visible character (a letter, digit, punctuation mark or symbol)"

_ALLOWED_TEXT = regex.compile(rf"{ALLOWED}*", regex.VERSION1)
_VISIBLE = regex.compile(VISIBLE, regex.VERSION1)


def name_problem(value: str) -> str | None:
    """Why `value` cannot be a name, or None when it can."""
    if _ALLOWED_TEXT.fullmatch(value) is None:
        return FORBIDDEN_MESSAGE
    if _VISIBLE.search(value) is None:
        return INVISIBLE_MESSAGE
    return None


def _code_point_ranges(character_class: str) -> list[tuple[int, int]]:
    """The code points a class of the rule holds, as (first, last) ranges."""
    everything = "".join(map(chr, range(0x110000)))
    found = regex.finditer(rf"{character_class}+", everything, regex.VERSION1)
    return [(match.start(), match.end() - 1) for match in found]


def _escaped(code_point: int) -> str:
    # \uXXXX reads the same in ECMA-262 and Python; past the BMP the character itself does (an
    # ECMA-262 pattern with the `u` flag, as JSON Schema validators compile them).
    return f"\\u{code_point:04x}" if code_point <= 0xFFFF else chr(code_point)


def _class_of(ranges: list[tuple[int, int]]) -> str:
    parts = (
        _escaped(first) if first == last else f"{_escaped(first)}-{_escaped(last)}"
        for first, last in ranges
    )
    return f"[{''.join(parts)}]"


@cache
def json_schema_pattern() -> str:
    """The rule as one JSON Schema pattern (ECMA-262, and Python's `re`): allowed characters, not
    all of them invisible. Written out as code point ranges (about 13 kB): JSON Schema patterns
    have no portable Unicode properties. One large class, and the invisible ones in a lookahead,
    keeps the pattern cheap for generators that expand classes character by character."""
    invisible = _code_point_ranges(rf"[{ALLOWED}--{VISIBLE}]")
    allowed = _code_point_ranges(ALLOWED)
    return f"^(?!{_class_of(invisible)}*$){_class_of(allowed)}*$"
