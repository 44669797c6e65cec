"""A character-level JSON prefix checker used to constrain generation to one JSON object.

The checker is a small pushdown automaton over characters. Its state is an immutable tuple,
so transitions can be memoised per ``(state, text)`` and candidate tokens can be tried
without copying anything. ``advance(state, text)`` returns the state after ``text`` or
``None`` when ``text`` cannot continue a valid JSON object; ``completion(state)`` is the
shortest text that closes everything that is open, which lets the sampler refuse tokens that
would leave too little room to finish before ``max_tokens``.

Only a top-level *object* is accepted (OpenAI's ``response_format: json_object``); leading
whitespace is allowed, anything after the closing brace is not.
"""

from __future__ import annotations

from functools import lru_cache

# Modes.
START = 0  # before the top-level object: whitespace or "{"
VALUE = 1  # expecting a value
OBJ_FIRST = 2  # after "{": a key or "}"
OBJ_KEY = 3  # after "," in an object: a key
COLON = 4  # after a key
AFTER = 5  # after a value: "," or a closing bracket
ARR_FIRST = 6  # after "[": a value or "]"
STRING = 7  # inside a string; aux = 1 for a key, 0 for a value
STR_ESC = 8  # after a backslash in a string
STR_U = 9  # inside \uXXXX; aux2 = hex digits seen
NUMBER = 10  # inside a number; aux = number sub-state
LITERAL = 11  # inside true/false/null; aux = the rest still to come (str)
DONE = 12  # the top-level object is closed

# Number sub-states.
N_MINUS = 0  # "-"
N_ZERO = 1  # "0" or "-0" (complete)
N_INT = 2  # digits (complete)
N_DOT = 3  # "1." (incomplete)
N_FRAC = 4  # "1.5" (complete)
N_E = 5  # "1e" (incomplete)
N_ESIGN = 6  # "1e-" (incomplete)
N_EXP = 7  # "1e5" (complete)

_WS = " \t\n\r"
_HEX = "0123456789abcdefABCDEF"
_ESCAPES = '"\\/bfnrtu'

# A state: (stack, mode, aux, aux2) where stack is a str of "o"/"a" (innermost last).
State = tuple[str, int, object, int]

INITIAL: State = ("", START, 0, 0)


def _after_value(stack: str) -> State:
    if not stack:
        return ("", DONE, 0, 0)
    return (stack, AFTER, 0, 0)


def _start_value(stack: str, c: str) -> State | None:
    """The state after ``c`` opens a value (whitespace must be handled by the caller)."""
    if c == "{":
        return (stack + "o", OBJ_FIRST, 0, 0)
    if c == "[":
        return (stack + "a", ARR_FIRST, 0, 0)
    if c == '"':
        return (stack, STRING, 0, 0)
    if c == "-":
        return (stack, NUMBER, N_MINUS, 0)
    if c == "0":
        return (stack, NUMBER, N_ZERO, 0)
    if c in "123456789":
        return (stack, NUMBER, N_INT, 0)
    if c == "t":
        return (stack, LITERAL, "rue", 0)
    if c == "f":
        return (stack, LITERAL, "alse", 0)
    if c == "n":
        return (stack, LITERAL, "ull", 0)
    return None


def _step(state: State, c: str) -> State | None:  # noqa: C901 - one automaton, one switch
    stack, mode, aux, aux2 = state
    if mode == STRING:
        if c == '"':
            return (stack, COLON, 0, 0) if aux == 1 else _after_value(stack)
        if c == "\\":
            return (stack, STR_ESC, aux, 0)
        if ord(c) < 0x20:
            return None
        return state
    if mode == STR_ESC:
        if c == "u":
            return (stack, STR_U, aux, 0)
        if c in _ESCAPES:
            return (stack, STRING, aux, 0)
        return None
    if mode == STR_U:
        if c not in _HEX:
            return None
        return (stack, STRING, aux, 0) if aux2 == 3 else (stack, STR_U, aux, aux2 + 1)
    if mode == NUMBER:
        n = aux
        if c.isdigit() and c.isascii():
            if n == N_MINUS:
                return (stack, NUMBER, N_ZERO if c == "0" else N_INT, 0)
            if n == N_ZERO:
                return None  # no leading zeros
            if n == N_INT:
                return state
            if n in (N_DOT, N_FRAC):
                return (stack, NUMBER, N_FRAC, 0)
            return (stack, NUMBER, N_EXP, 0)  # N_E, N_ESIGN, N_EXP
        if c == "." and n in (N_ZERO, N_INT):
            return (stack, NUMBER, N_DOT, 0)
        if c in "eE" and n in (N_ZERO, N_INT, N_FRAC):
            return (stack, NUMBER, N_E, 0)
        if c in "+-" and n == N_E:
            return (stack, NUMBER, N_ESIGN, 0)
        if n in (N_ZERO, N_INT, N_FRAC, N_EXP):
            # The number ended: the character belongs to what follows it.
            return _step(_after_value(stack), c)
        return None
    if mode == LITERAL:
        rest = str(aux)
        if c != rest[0]:
            return None
        return (stack, LITERAL, rest[1:], 0) if len(rest) > 1 else _after_value(stack)
    if c in _WS:
        return None if mode == DONE else state
    if mode == START:
        return (stack + "o", OBJ_FIRST, 0, 0) if c == "{" else None
    if mode in (VALUE, ARR_FIRST):
        if mode == ARR_FIRST and c == "]":
            return _after_value(stack[:-1])
        return _start_value(stack, c)
    if mode in (OBJ_FIRST, OBJ_KEY):
        if c == '"':
            return (stack, STRING, 1, 0)
        if mode == OBJ_FIRST and c == "}":
            return _after_value(stack[:-1])
        return None
    if mode == COLON:
        return (stack, VALUE, 0, 0) if c == ":" else None
    if mode == AFTER:
        top = stack[-1]
        if c == ",":
            return (stack, OBJ_KEY if top == "o" else VALUE, 0, 0)
        if (c == "}" and top == "o") or (c == "]" and top == "a"):
            return _after_value(stack[:-1])
        return None
    return None  # DONE: nothing may follow


@lru_cache(maxsize=1 << 18)
def advance(state: State, text: str) -> State | None:
    """The state after ``text``, or None when ``text`` makes the output invalid."""
    s: State | None = state
    for c in text:
        assert s is not None
        s = _step(s, c)
        if s is None:
            return None
    return s


def _closing_char(state: State) -> str:  # noqa: C901 - one case per automaton mode
    stack, mode, aux, _ = state
    if mode == START:
        return "{"
    if mode in (VALUE,):
        return "0"
    if mode == OBJ_FIRST:
        return "}"
    if mode == OBJ_KEY:
        return '"'
    if mode == COLON:
        return ":"
    if mode == ARR_FIRST:
        return "]"
    if mode == STRING:
        return '"'
    if mode == STR_ESC:
        return "n"
    if mode == STR_U:
        return "0"
    if mode == NUMBER:
        if aux in (N_MINUS, N_DOT, N_E, N_ESIGN):
            return "0"
        return "}" if stack[-1] == "o" else "]"
    if mode == LITERAL:
        return str(aux)[0]
    if mode == AFTER:
        return "}" if stack[-1] == "o" else "]"
    raise ValueError("the JSON value is already complete")


@lru_cache(maxsize=1 << 16)
def completion(state: State) -> str:
    """The shortest text that turns the output so far into one complete JSON object."""
    out: list[str] = []
    s: State | None = state
    while s is not None and s[1] != DONE:
        c = _closing_char(s)
        out.append(c)
        s = _step(s, c)
    if s is None:  # pragma: no cover - the closing characters are always valid
        raise AssertionError("no completion")
    return "".join(out)


def is_done(state: State) -> bool:
    return state[1] == DONE


def allowed(state: State, text: str, tokens_left_after: int) -> State | None:
    """The state after ``text`` if the token is allowed with ``tokens_left_after`` tokens to go.

    A token is allowed when the output stays a valid prefix and the rest can still be closed
    within the remaining budget (each closing character is assumed to take one token, which
    is true for every byte-level or sentencepiece vocabulary: they all have ``}`` ``]`` ``"``
    ``0`` ``:`` as single tokens).
    """
    if not text:
        return None
    s = advance(state, text)
    if s is None:
        return None
    if s[1] == DONE:
        return s
    if len(completion(s)) > tokens_left_after:
        return None
    return s
