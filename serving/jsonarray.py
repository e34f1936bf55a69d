"""Request JSON read in memory proportional to its size: arrays of numbers without a Python
object per element.

``json.loads`` and pydantic build one Python object per array element before anything is
checked, so 16 MiB of nested empty lists grew a replica by over 30 times its size and took
seconds to refuse. :func:`read_json` reads the arrays a door names (the native ``inputs``,
each OIP tensor's ``data``) as :class:`JSONArray` s instead: their shape is checked on a copy
of their brackets and commas alone, and their numbers are parsed later, :data:`CHUNK` bytes at
a time, straight into numpy. The rest of a request, small in any valid one, is read into
Python values, up to :data:`OTHER_LIMIT` bytes and :data:`MAX_DEPTH` levels.

Values are those ``json.loads`` gives: pydantic-core's parser reads every token, and it agrees
with ``json`` on every number (``NaN`` and ``Infinity`` included). A key repeated in one object
is refused, where ``json`` would keep its last value.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic_core import from_json

from serving.errors import JSONError
from serving.quoting import quote

CHUNK = 1 << 16
"""Bytes of array text parsed at a time: this bounds the Python values alive during a parse."""
OTHER_LIMIT = 1 << 16
"""Bytes of JSON a request may hold besides its arrays of numbers (options, names, shapes)."""
MAX_DEPTH = 64
"""Levels of nesting allowed outside arrays of numbers."""

Path = tuple[str | int, ...]
"""Where a value sits in a document: the keys and list indices from the root."""


_BLANKS = b" \t\n\r"
_STRUCTURE = b"[],"
_NUMBERS_AND_BLANKS = b"0123456789+-.eE" + _BLANKS
_OUTSIDE_ARRAYS = (b'"', b"{", b"}", b":")
"""Characters an array of numbers cannot hold: it ends before the first that follows it."""
_TOKEN = re.compile(rb'[ \t\n\r]*([\[\]{}:,]|"(?:[^"\\]|\\.)*"|[^ \t\n\r\[\]{}:,"]+)', re.DOTALL)
"""Blanks, then a punctuation mark, a whole string, or a bare word (number or literal)."""
_BLANK = re.compile(rb"[ \t\n\r]*")
_OPENING = re.compile(rb"\[*")
NOT_AN_ARRAY = "must be a rectangular array of numbers"
"""How every refusal of an array's content starts, after the array's place."""
_RAGGED = f"{NOT_AN_ARRAY} (nested lists of equal lengths)"


class _NotNumbers(Exception):
    """An array of numbers that holds a string or an object: ``str()`` says which."""


@dataclass(frozen=True)
class JSONArray:
    """A rectangular JSON array of numbers: its shape checked, its numbers not yet parsed."""

    body: bytes
    start: int
    end: int
    """``body[start:end]`` is the array's text, from its ``[`` to its ``]``."""
    shape: tuple[int, ...]
    plain: bool
    """Nothing but digits, signs, points and exponents between the brackets: every element
    is an int or a float (no ``true``, ``null`` or ``NaN``), so a type check can be skipped."""
    where: str
    """The array's place in the document (``inputs``, ``inputs.0.data``), for messages."""

    def __len__(self) -> int:
        return self.shape[0]

    @classmethod
    def read(cls, body: bytes, start: int, max_rank: int, where: str) -> JSONArray:
        """The array whose ``[`` is ``body[start]``, of at most ``max_rank`` dimensions.

        Costs a copy of the array's brackets and commas, but none for an array that opens
        deeper than ``max_rank``. Raises :class:`~serving.errors.JSONError`, or
        :class:`_NotNumbers` if the array holds a string or an object.
        """
        if _opens_deeper(body, start, max_rank):
            raise JSONError(f"{where} is nested deeper than {max_rank} levels")
        structure, plain, stop = _skeleton(body, start)
        del structure[structure.rfind(b"]") + 1 :]  # what follows the array is the reader's
        rank = _OPENING.match(structure).end()
        if rank > max_rank:
            raise JSONError(f"{where} is nested deeper than {max_rank} levels")
        shape = _shape(structure, rank) if rank else None
        if shape is None:
            if rank and structure.count(b"[") == structure.count(b"]"):
                raise JSONError(f"{where} {_RAGGED}")
            if stop < len(body) and body[stop] in b'"{':
                raise _NotNumbers("a string" if body[stop] == ord('"') else "an object")
            raise JSONError(f"the body is not valid JSON: the array at byte {start} is not closed")
        end = body.rfind(b"]", start, stop) + 1
        if shape[-1] == 1 and plain and not _has_numbers(body, start, end):
            shape = (*shape[:-1], 0)  # "[]" holds no element rather than one
        return cls(body, start, end, shape, plain, where)

    def to_numpy(self, dtype: type | np.dtype, convert: Callable[[list[Any]], Any]) -> np.ndarray:
        """The elements as a ``dtype`` array of :attr:`shape`; ``convert`` turns each chunk of
        Python values into numbers, refusing the kinds its caller does not take."""
        count = math.prod(self.shape)
        if not count:
            return np.empty(self.shape, dtype)
        out: np.ndarray | None = None
        filled = 0
        for values in self._chunks():
            if filled + len(values) > count:
                break
            if out is None:  # allocated once the text has proved to hold values
                out = np.empty(count, dtype)
            out[filled : filled + len(values)] = convert(values)
            filled += len(values)
        if out is None or filled != count:  # a guard: the checks above leave no such case
            raise JSONError(f"{self.where} {_RAGGED}")
        return out.reshape(self.shape)

    def _chunks(self) -> Iterator[list[Any]]:
        """The elements in order, as a list of Python values per :data:`CHUNK` bytes of text.

        The text between two commas with its brackets blanked is a flat JSON list, which the
        parser checks. Blanking hides one fault only, a list with an empty slot ("[," ",]" or
        "[]") next to a value outside it, which the brackets' neighbours reveal."""
        body, lo = memoryview(self.body), self.start
        while lo < self.end:
            hi = self.end
            if hi - lo > CHUNK:
                hi = self.body.rfind(b",", lo + 1, lo + CHUNK)
                if hi < 0:
                    hi = self.body.find(b",", lo + CHUNK, self.end)
                    hi = self.end if hi < 0 else hi
            text = bytearray(hi - lo + 2)  # a zero byte either side, a "[" and "]" later
            text[1:-1] = body[lo:hi]
            chars = np.frombuffer(text, np.uint8)
            brackets = _brackets(chars)
            if _next_to_empty_slot(chars, brackets) and self._has_empty_slot(lo, hi):
                raise JSONError(f"{self.where} {_RAGGED}")
            chars[brackets] = ord(" ")
            del chars  # the buffer export ends, so the text can be handed on
            text[0], text[-1] = ord("["), ord("]")
            try:
                values = from_json(text)
            except ValueError as err:
                reason = str(err).partition(" at line ")[0]
                raise JSONError(f"{self.where} {NOT_AN_ARRAY}: {reason}") from None
            yield values
            lo = hi + 1

    def _has_empty_slot(self, lo: int, hi: int) -> bool:
        """Whether ``body[lo:hi]`` and the commas around it, blanks dropped, hold "[," ",]"
        or "[]" (blanks next to brackets keep the quick check from telling)."""
        text = self.body[max(lo - 1, self.start) : min(hi + 1, self.end)].translate(None, _BLANKS)
        chars = np.frombuffer(b"\0" + text + b"\0", np.uint8)
        return _next_to_empty_slot(chars, _brackets(chars))


def _brackets(chars: np.ndarray) -> np.ndarray:
    return np.flatnonzero((chars == ord("[")) | (chars == ord("]")))


_AFTER_OPENING = np.isin(np.arange(256), list(b",] \t\n\r\0"))
_BEFORE_CLOSING = np.isin(np.arange(256), list(b",[ \t\n\r\0"))


def _next_to_empty_slot(chars: np.ndarray, brackets: np.ndarray) -> bool:
    """Whether a "[" is followed, or a "]" preceded, by a comma, the other bracket, a blank or
    the zero byte that ends ``chars``: an empty slot, or a blank that hides what is next."""
    opening = chars[brackets] == ord("[")
    after = chars[brackets[opening] + 1]
    before = chars[brackets[~opening] - 1]
    return bool(_AFTER_OPENING[after].any() or _BEFORE_CLOSING[before].any())


def _opens_deeper(body: bytes, start: int, rank: int) -> bool:
    """Whether the array at ``body[start]`` opens with more than ``rank`` brackets (blanks
    between them allowed): read without a copy, as far as the ``rank + 1``-th bracket."""
    return re.compile(rb"(?:\[[ \t\n\r]*){%d}" % (rank + 1)).match(body, start) is not None


def _skeleton(body: bytes, start: int) -> tuple[bytearray, bool, int]:
    """The brackets and commas of ``body[start:]`` up to the first character no array of
    numbers holds (``"{}:``); whether only numbers and blanks were left out; and where that
    character is (or the body's length). Each step copies at most :data:`CHUNK` bytes."""
    structure, plain, stop = bytearray(), True, len(body)
    for lo in range(start, len(body), CHUNK):
        piece = body[lo : lo + CHUNK].translate(None, _NUMBERS_AND_BLANKS)
        odd = piece.translate(None, _STRUCTURE)  # true, null, NaN, stray bytes, or the end
        if any(char in odd for char in _OUTSIDE_ARRAYS):
            stop = min(i for char in _OUTSIDE_ARRAYS if (i := body.find(char, lo, lo + CHUNK)) >= 0)
            # translate keeps the order of what it keeps: the piece's first one is at stop
            piece = piece[: min(i for char in _OUTSIDE_ARRAYS if (i := piece.find(char)) >= 0)]
            odd = piece.translate(None, _STRUCTURE)
        structure += piece.translate(None, odd) if odd else piece
        plain = plain and not odd
        if stop < len(body):
            break
    return structure, plain, stop


def _string_end(body: bytes, at: int) -> int:
    """Where the string whose opening quote is ``body[at]`` ends (past its closing quote), or
    the body's length if it is not closed; :data:`_TOKEN` takes a second per 10 MB."""
    pos = at + 1
    while (quote_at := body.find(b'"', pos)) >= 0:
        escapes = quote_at
        while body[escapes - 1] == ord("\\"):
            escapes -= 1
        if (quote_at - escapes) % 2 == 0:
            return quote_at + 1
        pos = quote_at + 1
    return len(body)


def _has_numbers(body: bytes, start: int, end: int) -> bool:
    return any(
        body[lo : min(lo + CHUNK, end)].translate(None, _STRUCTURE + _BLANKS)
        for lo in range(start, end, CHUNK)
    )


def _shape(structure: bytes | bytearray, rank: int) -> tuple[int, ...] | None:
    """The shape of the rectangular array whose brackets and commas are ``structure``, or
    ``None`` if it is ragged; ``[]`` counts as one element, since numbers leave no trace here.

    The first list at each depth starts at that depth's leading ``[`` and ends with the first
    run of as many ``]`` as there are depths from it down; a list is rectangular if it
    repeats its first element, comma-separated, which ``startswith`` checks in place.
    """
    firsts = _first_runs(structure, rank)
    if firsts is None:
        return None
    view = memoryview(structure)
    dims: list[int] = []
    inner = 0  # the length of one element of the lists at this depth
    for depth in reversed(range(rank)):
        length = firsts[rank - depth] + rank - 2 * depth
        step = inner + 1
        count, extra = divmod(length - 1, step)
        first, last = depth + 1, depth + length - 1  # the list's inside
        if extra or (
            count > 1
            and (
                structure[first + inner] != ord(",")
                or not structure.startswith(view[first : last - step], first + step)
            )
        ):
            return None
        dims.append(count)
        inner = length
    return tuple(reversed(dims)) if inner == len(structure) else None


def _first_runs(structure: bytes | bytearray, rank: int) -> list[int] | None:
    """Where the first run of at least ``k`` ``]`` starts, for ``k`` in 1..``rank`` (index
    0 unused), in one pass; ``None`` if there is no run of ``rank``."""
    firsts = [0] * (rank + 1)
    pos, k = 0, 1
    while k <= rank:
        at = structure.find(b"]" * k, pos)
        if at < 0:
            return None
        head = structure[at : at + rank]
        run = len(head) - len(head.lstrip(b"]"))
        firsts[k : run + 1] = [at] * (run + 1 - k)
        pos, k = at + run, run + 1
    return firsts


def read_json(
    body: bytes,
    arrays: Callable[[Path], int | None],
    *,
    any_elements: bool = False,
    long_strings: Callable[[Path], bool] = lambda path: False,
) -> Any:
    """The JSON document ``body`` as Python values, with a :class:`JSONArray` for each array
    at a path where ``arrays(path)`` gives its most dimensions.

    Such an array that holds strings or objects is refused, or with ``any_elements`` read as
    plain JSON (within :data:`OTHER_LIMIT`). The strings directly in a list at a path where
    ``long_strings(path)`` holds (encoded images) count, like arrays of numbers, against no
    limit but the body's size. Raises :class:`~serving.errors.JSONError`: 413 past
    :data:`OTHER_LIMIT`, 400 otherwise.
    """
    reader = _Reader(body, arrays, any_elements, long_strings)
    token, at = reader.token()
    document = reader.value(token, at, (), 0)
    after = _BLANK.match(body, reader.pos).end()
    if after != len(body):
        raise JSONError(f"the body is not valid JSON: more follows its value at byte {after}")
    return document


class _Reader:
    """Recursive descent over a document: Python values, but arrays of numbers skipped over."""

    def __init__(
        self,
        body: bytes,
        arrays: Callable[[Path], int | None],
        any_elements: bool,
        long_strings: Callable[[Path], bool],
    ) -> None:
        self.body, self.arrays, self.any_elements = body, arrays, any_elements
        self.long_strings = long_strings
        self.pos = 0
        self.limit = OTHER_LIMIT
        """How far the text outside arrays of numbers may reach: the budget plus the arrays."""

    def token(self) -> tuple[bytes, int]:
        """The next punctuation mark, string or bare word, and where it starts."""
        body = self.body
        match = _TOKEN.match(body, self.pos, self.limit + 1)
        if (match is not None and match.end() > self.limit) or (
            match is None and self.limit + 1 < len(body)
        ):
            raise JSONError(
                f"the body holds over {OTHER_LIMIT} bytes of JSON besides its arrays of numbers",
                413,
            )
        if match is None:
            at = _BLANK.match(body, self.pos).end()
            problem = "it ends early" if at == len(body) else f"a string at byte {at} is not closed"
            raise JSONError(f"the body is not valid JSON: {problem}")
        self.pos = match.end()
        return match[1], match.start(1)

    def expect(self, *tokens: bytes) -> bytes:
        token, at = self.token()
        if token not in tokens:
            wanted = " or ".join(repr(t.decode()) for t in tokens)
            raise JSONError(f"the body is not valid JSON: expected {wanted} at byte {at}")
        return token

    def value(self, token: bytes, at: int, path: Path, depth: int) -> Any:
        """The value that starts with ``token``."""
        if depth > MAX_DEPTH:
            raise JSONError(f"the body nests deeper than {MAX_DEPTH} levels")
        if token == b"{":
            return self.read_object(path, depth + 1)
        if token == b"[":
            rank = self.arrays(path)
            array = None if rank is None else self.read_array(at, rank, path)
            return self.read_list(path, depth + 1) if array is None else array
        if token in (b"]", b"}", b":", b","):
            unexpected = token.decode()
            raise JSONError(f"the body is not valid JSON: unexpected {unexpected!r} at byte {at}")
        return self.scalar(token, at)

    def scalar(self, token: bytes, at: int) -> Any:
        try:
            return from_json(token)
        except ValueError:
            text = quote(token.decode(errors="replace"))
            raise JSONError(f"the body is not valid JSON: {text} at byte {at}") from None

    def read_object(self, path: Path, depth: int) -> dict[str, Any]:
        members: dict[str, Any] = {}
        token, at = self.token()
        if token == b"}":
            return members
        while True:
            if not token.startswith(b'"'):
                raise JSONError(f"the body is not valid JSON: expected a key at byte {at}")
            key = self.scalar(token, at)
            if key in members:
                raise JSONError(f"the body repeats the key {quote(key)} in one object")
            self.expect(b":")
            token, at = self.token()
            members[key] = self.value(token, at, (*path, key), depth)
            if self.expect(b",", b"}") == b"}":
                return members
            token, at = self.token()

    def read_list(self, path: Path, depth: int) -> list[Any]:
        items: list[Any] = []
        long_strings = self.long_strings(path)
        while True:
            string = self.long_string() if long_strings else None
            if string is not None:
                items.append(string)
            else:
                token, at = self.token()
                if token == b"]" and not items:
                    return items
                items.append(self.value(token, at, (*path, len(items)), depth))
            if self.expect(b",", b"]") == b"]":
                return items

    def long_string(self) -> str | None:
        """The string that comes next, read past the limit (which grows by its length), or
        ``None`` if no string comes next."""
        at = _BLANK.match(self.body, self.pos).end()
        if self.body[at : at + 1] != b'"':
            return None
        end = _string_end(self.body, at)
        if end == len(self.body):
            raise JSONError(f"the body is not valid JSON: a string at byte {at} is not closed")
        self.pos, self.limit = end, self.limit + end - at
        return self.scalar(self.body[at:end], at)

    def read_array(self, at: int, rank: int, path: Path) -> JSONArray | None:
        """The array of numbers that starts at ``at``; ``None`` to read it as plain JSON."""
        where = ".".join(map(str, path))
        try:
            array = JSONArray.read(self.body, at, rank, where)
        except _NotNumbers as err:
            if self.any_elements:
                return None
            raise JSONError(f"{where} {NOT_AN_ARRAY}, got {err}") from None
        self.pos = array.end
        self.limit += array.end - at
        return array
