"""Regexes matched in time linear in the text, for the patterns users and files give us.

Python's ``re`` backtracks: ``re.search(r"(\\w+)+!", name)`` takes time exponential in
``len(name)``, so one hostile ``rank_pattern`` key in an ``adapter_config.json`` could stall
`lora.load_peft` for hours. This module answers the same yes/no questions (`Pattern.fullmatch`,
`Pattern.search`) in ``O(len(text))`` steps after warm-up, RE2's way:

1. parse with Python's own parser (``re._parser``, Python 3.11-3.13), so the syntax, the
   inline flags and the meaning of every character class are exactly Python's;
2. build a Thompson NFA from the parse tree (one rule per opcode, `_RULES`); every node that
   consumes one character tests it with a one-character Python regex rebuilt from that node
   and its flags (``re`` cannot backtrack on one character);
3. simulate the NFA on sets of states, caching the sets met as the states of a DFA built
   lazily (`_State`); a cached transition costs one dict lookup, a new one one pass over the
   NFA (a "set step", counted in `Pattern.set_steps`). The cache holds at most `MAX_STATES`
   states and starts over when full, so a text of ``n`` characters costs at most ``n + 1``
   set steps of ``O(NFA size)`` each, whatever the pattern.

Whether a match exists does not depend on greedy versus lazy repeats, so both are supported.
Refused (a ``ValueError``): backreferences, lookahead / lookbehind, conditionals, atomic
groups and possessive repeats (``a*+a`` never matches ``"aa"``: not the language of ``a*a``),
and patterns whose NFA has over `MAX_NODES` nodes (large ``{m,n}`` counts copy their item).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:  # typeshed types re's private modules under their old public names
    import sre_constants as C
    import sre_parse as _parser
else:
    from re import _constants as C
    from re import _parser

MAX_NODES = 10_000  # NFA nodes; one set step is one pass over them
MAX_STATES = 2_048  # cached DFA states before the cache starts over

_WORD = re.compile(r"\w").fullmatch
_ASCII_WORD = re.compile(r"\w", re.ASCII).fullmatch


class _Side(NamedTuple):
    """What an assertion may ask about the character on one side of a text position."""

    edge: bool  # no character there: the start (before) or the end (after) of the text
    newline: bool
    word: bool  # ``\w`` with Unicode classes
    ascii_word: bool  # ``\w`` under ``re.ASCII``


class _Where(NamedTuple):
    """A position of the text, as far as ``^ $ \\A \\Z \\b \\B`` can tell."""

    before: _Side
    after: _Side
    last_newline: bool  # ``after`` is the text's last character and a newline (for ``$``)
    empty: bool  # the whole text is empty (Python's ``\\b`` and ``\\B`` both fail there)


_EDGE = _Side(True, False, False, False)


@functools.lru_cache(maxsize=4096)
def _side(char: str) -> _Side:
    return _Side(False, char == "\n", bool(_WORD(char)), bool(_ASCII_WORD(char)))


def _word(side: _Side, flags: int) -> bool:
    return side.ascii_word if flags & C.SRE_FLAG_ASCII else side.word


_Av = Any
"""A parsed node's argument: its type depends on the node's op code (typeshed's union
``sre_parse._AvType``), which the tables below dispatch on."""

# -- assertions: Python's meaning of each AT code (CPython's Modules/_sre/sre_lib.h ``at``) --
_Predicate = Callable[[_Where], bool]
_AT: dict[int, Callable[[int], _Predicate]] = {
    C.AT_BEGINNING: lambda f: (
        (lambda w: w.before.edge or w.before.newline)
        if f & C.SRE_FLAG_MULTILINE
        else (lambda w: w.before.edge)
    ),
    C.AT_BEGINNING_STRING: lambda f: lambda w: w.before.edge,
    C.AT_END: lambda f: (
        (lambda w: w.after.edge or w.after.newline)
        if f & C.SRE_FLAG_MULTILINE
        else (lambda w: w.after.edge or w.last_newline)
    ),
    C.AT_END_STRING: lambda f: lambda w: w.after.edge,
    C.AT_BOUNDARY: lambda f: lambda w: not w.empty and _word(w.before, f) != _word(w.after, f),
    C.AT_NON_BOUNDARY: lambda f: lambda w: not w.empty and _word(w.before, f) == _word(w.after, f),
}


# -- one-character tests: the node rebuilt as a one-character Python regex ---------------------
def _char(code: int) -> str:
    return f"\\U{code:08x}"


_CATEGORIES = {
    C.CATEGORY_DIGIT: r"\d",
    C.CATEGORY_NOT_DIGIT: r"\D",
    C.CATEGORY_SPACE: r"\s",
    C.CATEGORY_NOT_SPACE: r"\S",
    C.CATEGORY_WORD: r"\w",
    C.CATEGORY_NOT_WORD: r"\W",
}
_SET_ITEMS: dict[int, Callable[[_Av], str]] = {
    C.NEGATE: lambda _: "^",
    C.LITERAL: _char,
    C.RANGE: lambda av: f"{_char(av[0])}-{_char(av[1])}",
    C.CATEGORY: lambda av: _CATEGORIES[av],
}
_CHAR_SOURCES: dict[int, Callable[[_Av], str]] = {
    C.LITERAL: _char,
    C.NOT_LITERAL: lambda av: f"[^{_char(av)}]",
    C.ANY: lambda _: ".",
    C.IN: lambda items: "[" + "".join(_SET_ITEMS[op](av) for op, av in items) + "]",
}
_FLAG_LETTERS = ((C.SRE_FLAG_IGNORECASE, "i"), (C.SRE_FLAG_DOTALL, "s"), (C.SRE_FLAG_ASCII, "a"))


_Test = Callable[[str], "re.Match[str] | None"]
"""A one-character test: the compiled character regex's ``fullmatch``."""


@functools.lru_cache(maxsize=4096)
def _char_test(source: str, flags: int) -> _Test:
    letters = "".join(letter for flag, letter in _FLAG_LETTERS if flags & flag)
    return re.compile(f"(?{letters}){source}" if letters else source).fullmatch


# -- the NFA -----------------------------------------------------------------------------------
_UNSUPPORTED = ", which flax_lora's linear-time matcher does not support"


class _Refusal(Exception):
    """Why a pattern is not compiled (internal: `compile` turns it into a ValueError)."""


class _Nfa:
    """Thompson NFA under construction: node ``i`` has successors ``succ[i]`` and either a
    one-character ``test[i]`` (it consumes a character), an assertion ``pred[i]`` (it passes
    when the position satisfies it), or neither (an epsilon split; with no successors, the
    match node)."""

    def __init__(self) -> None:
        self.succ: list[tuple[int, ...]] = []
        self.test: list[_Test | None] = []
        self.pred: list[_Predicate | None] = []

    def node(
        self, succ: tuple[int, ...] = (), test: _Test | None = None, pred: _Predicate | None = None
    ) -> int:
        if len(self.succ) >= MAX_NODES:
            raise _Refusal(
                f"is too large for flax_lora's linear-time matcher (over {MAX_NODES} NFA "
                "nodes; a {m,n} repeat copies its item n times): use a smaller count or *, +"
            )
        self.succ.append(succ)
        self.test.append(test)
        self.pred.append(pred)
        return len(self.succ) - 1


_Rule = Callable[[_Nfa, _Av, int, int], int]
"""How one op code adds its nodes: ``rule(nfa, av, flags, nxt) -> its first node``."""


def _seq(nfa: _Nfa, items: Iterable[tuple[int, _Av]], flags: int, nxt: int) -> int:
    """The NFA of the parsed items (a SubPattern or a list), followed by node ``nxt``."""
    for op, av in reversed(list(items)):
        if op not in _RULES:
            raise _Refusal(f"uses {_REFUSED.get(op, str(op))}{_UNSUPPORTED}")
        nxt = _RULES[op](nfa, av, flags, nxt)
    return nxt


def _consume(op: int) -> _Rule:
    return lambda nfa, av, flags, nxt: nfa.node(
        (nxt,), test=_char_test(_CHAR_SOURCES[op](av), flags)
    )


def _branch(nfa: _Nfa, av: _Av, flags: int, nxt: int) -> int:
    return nfa.node(tuple(_seq(nfa, alt, flags, nxt) for alt in av[1]))


def _group(nfa: _Nfa, av: _Av, flags: int, nxt: int) -> int:
    _, add, remove, items = av
    if add & _parser.TYPE_FLAGS:  # as re._compiler._combine_flags: (?a:...) replaces the type flag
        flags &= ~_parser.TYPE_FLAGS
    return _seq(nfa, items, (flags | add) & ~remove, nxt)


def _repeat(nfa: _Nfa, av: _Av, flags: int, nxt: int) -> int:
    low, high, items = av
    if high == C.MAXREPEAT:
        loop = nfa.node()
        nfa.succ[loop] = (_seq(nfa, items, flags, loop), nxt)
        tail = loop
    else:  # (x(x(x)?)?)? for high - low optional copies
        tail = nxt
        for _ in range(high - low):
            tail = nfa.node((_seq(nfa, items, flags, tail), nxt))
    for _ in range(low):
        tail = _seq(nfa, items, flags, tail)
    return tail


def _at(nfa: _Nfa, av: _Av, flags: int, nxt: int) -> int:
    return nfa.node((nxt,), pred=_AT[av](flags))


def _lookaround(op: int) -> _Rule:
    def refuse(nfa: _Nfa, av: _Av, flags: int, nxt: int) -> int:
        kind = "lookahead" if av[0] == 1 else "lookbehind"
        negative = "a negative " if op is C.ASSERT_NOT else "a "
        raise _Refusal(f"uses {negative}{kind}{_UNSUPPORTED}")

    return refuse


_RULES: dict[int, _Rule] = {
    **{op: _consume(op) for op in _CHAR_SOURCES},
    C.BRANCH: _branch,
    C.SUBPATTERN: _group,
    C.MAX_REPEAT: _repeat,
    C.MIN_REPEAT: _repeat,  # lazy: the same language
    C.AT: _at,
    C.ASSERT: _lookaround(C.ASSERT),
    C.ASSERT_NOT: _lookaround(C.ASSERT_NOT),
}
_REFUSED: dict[int, str] = {
    C.GROUPREF: r"a backreference (\1, (?P=name))",
    C.GROUPREF_EXISTS: "a conditional (?(group)yes|no)",
    C.ATOMIC_GROUP: "an atomic group (?>...)",
    C.POSSESSIVE_REPEAT: "a possessive repeat (*+, ++, ?+, {m,n}+)",
}


# -- the lazily built DFA ----------------------------------------------------------------------
class _State:
    """A DFA state: the NFA nodes still to close over (``pending``, before the assertions at
    this position, which need the next character) and the character before the position."""

    __slots__ = ("before", "end", "final", "next", "pending")

    def __init__(self, pending: frozenset[int], before: _Side, final: bool | None = None):
        self.pending, self.before, self.final = pending, before, final
        self.next: dict[str, _State] = {}  # character -> state (the cache)
        self.end: dict[bool, bool] = {}  # text empty -> whether the text matches here


_ACCEPT = _State(frozenset(), _EDGE, final=True)
_DEAD = _State(frozenset(), _EDGE, final=False)
_LAST_NEWLINE = "\n$"  # the key of a newline that ends the text (``$`` matches before it)


class Pattern:
    """A compiled pattern: `fullmatch` and `search` as ``re``'s, answering only whether.

    Made by `compile`. Its DFA cache fills as texts are matched (the only state it changes;
    `set_steps` counts the uncached steps, for tests and measurements).
    """

    def __init__(self, pattern: str, nfa: _Nfa, start: int, match: int) -> None:
        self.pattern = pattern
        self.set_steps = 0
        self._nfa, self._start, self._match = nfa, start, match
        self._states: dict[tuple[frozenset[int], _Side, bool], _State] = {}
        self._starts = {s: self._intern(frozenset((start,)), _EDGE, s) for s in (False, True)}

    def __repr__(self) -> str:
        return f"flax_lora._regex.Pattern({self.pattern!r})"

    def fullmatch(self, text: str) -> bool:
        """Whether the whole of ``text`` matches (``re.fullmatch(pattern, text) is not None``)."""
        return self._run(text, False)

    def search(self, text: str) -> bool:
        """Whether some part of ``text`` matches (``re.search(pattern, text) is not None``)."""
        return self._run(text, True)

    def _run(self, text: str, search: bool) -> bool:
        state = self._starts[search]
        body = text[:-1] if text.endswith("\n") else text
        for char in body:
            nxt = state.next.get(char) or self._step(state, char, False, search)
            if nxt.final is not None:
                return nxt.final
            state = nxt
        if len(body) < len(text):
            nxt = state.next.get(_LAST_NEWLINE) or self._step(state, "\n", True, search)
            if nxt.final is not None:
                return nxt.final
            state = nxt
        empty = not text
        if empty not in state.end:
            state.end[empty] = self._closure(state, _Where(state.before, _EDGE, False, empty))[1]
        return state.end[empty]

    def _closure(self, state: _State, where: _Where) -> tuple[list[int], bool]:
        """The character-consuming nodes reachable from ``state.pending`` through epsilons and
        the assertions true at ``where``, and whether the match node is among the reachable."""
        self.set_steps += 1
        succ, test, pred = self._nfa.succ, self._nfa.test, self._nfa.pred
        seen, stack, chars = set(), list(state.pending), []
        while stack:
            i = stack.pop()
            if i in seen:
                continue
            seen.add(i)
            if test[i] is not None:
                chars.append(i)
            elif (p := pred[i]) is None or p(where):
                stack.extend(succ[i])
        return chars, self._match in seen

    def _step(self, state: _State, char: str, last_newline: bool, search: bool) -> _State:
        """The state after ``char`` (``last_newline``: a newline that ends the text)."""
        after = _side(char)
        chars, matched = self._closure(state, _Where(state.before, after, last_newline, False))
        if matched and search:
            nxt = _ACCEPT
        else:
            test, passed = self._nfa.test, []
            hits: dict[_Test, bool] = {}
            for i in chars:
                t = test[i]
                assert t is not None  # chars holds the consuming nodes only
                if t not in hits:
                    hits[t] = t(char) is not None
                if hits[t]:
                    passed.append(self._nfa.succ[i][0])
            pending = frozenset(passed)
            if search:
                pending |= {self._start}
            nxt = self._intern(pending, after, search) if pending else _DEAD
        state.next[_LAST_NEWLINE if last_newline else char] = nxt
        return nxt

    def _intern(self, pending: frozenset[int], before: _Side, search: bool) -> _State:
        key = (pending, before, search)
        if key not in self._states:
            if len(self._states) >= MAX_STATES:  # start over: drop every cached transition
                for s in self._states.values():
                    s.next.clear()
                self._states = {(s.pending, s.before, k): s for k, s in self._starts.items()}
            self._states.setdefault(key, _State(pending, before))
        return self._states[key]


@functools.lru_cache(maxsize=1024)
def _build(pattern: str) -> Pattern | str:
    """The compiled pattern, or why not (the end of a sentence that starts with the pattern)."""
    try:
        parsed = _parser.parse(pattern)
    except (re.error, OverflowError) as e:
        return f"is not a valid regex ({e})"
    except RecursionError:
        return "is nested too deeply"
    nfa = _Nfa()
    try:
        match = nfa.node()
        start = _seq(nfa, parsed.data, parsed.state.flags, match)
    except _Refusal as e:
        return str(e)
    except RecursionError:
        return "is nested too deeply for flax_lora's linear-time matcher"
    return Pattern(pattern, nfa, start, match)


def compile(pattern: str, what: str = "pattern") -> Pattern:
    """``pattern`` compiled for matching in time linear in the text (cached per pattern).

    Examples:
      >>> _regex.compile(r"(\\w+)+!", "LoraConfig.rank_pattern").search("encoder/layer_0")
      False

    Args:
      pattern: a Python regex without backreferences, lookarounds, conditionals, atomic groups
        or possessive repeats.
      what: what the pattern is, for error messages (e.g. ``"LoraConfig.targets"``).

    Returns:
      A `Pattern`.

    Raises:
      ValueError: naming ``what`` and the pattern, if it is not a valid regex, uses a refused
        construct, or is too large.
      TypeError: naming ``what``, if ``pattern`` is not a string.
    """
    if not isinstance(pattern, str):
        raise TypeError(
            f"{what} must be a regex string; got {pattern!r} ({type(pattern).__name__})."
        )
    built = _build(pattern)
    if isinstance(built, str):
        raise ValueError(f"{what}: {pattern!r} {built}.")
    return built


def fullmatch(pattern: str, text: str, what: str = "pattern") -> bool:
    """``compile(pattern, what).fullmatch(text)``."""
    return compile(pattern, what).fullmatch(text)


def search(pattern: str, text: str, what: str = "pattern") -> bool:
    """``compile(pattern, what).search(text)``."""
    return compile(pattern, what).search(text)
