"""Personal data in captions: e-mail addresses, phone numbers, IP addresses and payment card numbers.

The patterns (documented here, tested in ``tests/test_personal.py``):

- ``email``: ``local@domain.tld`` (letters, digits and ``._%+-`` before the ``@``; a dotted domain with a 2-24
  letter top level);
- ``card``: 13 to 19 digits, optionally grouped by single spaces or hyphens, that pass the Luhn check (so most
  long product or order numbers do not match);
- ``phone``: a number of 9 to 15 digits (ITU E.164's limit) written as phone numbers are: an optional ``+`` and
  country code, digit groups separated by spaces, dots, hyphens or a parenthesised area code; a run of plain
  digits needs the ``+``, so years, sizes, file numbers (``IMG_2019``) and resolutions (``1920x1080``) do not match;
- ``ip``: an IPv4 dotted quad (each part 0-255), or an IPv6 address (at least two colons, valid for
  :mod:`ipaddress`).

:func:`mask` replaces each match with ``[email]``, ``[card]``, ``[phone]`` or ``[ip]``. Names, street addresses and
faces in captions are not found: no pattern catches them reliably.
"""

from __future__ import annotations

import ipaddress
import re

KINDS = ("email", "card", "phone", "ip")
_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]{1,64}@(?:[A-Za-z0-9-]{1,63}\.)+[A-Za-z]{2,24}(?![\w-])")
_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
_PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]\d{2,4}){1,5}(?![\w])"
                    r"|(?<![\w+])\+\d{9,15}(?!\w)")
_IPV4 = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?![\d.])")
_IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _digits(text: str) -> str:
    return "".join(ch for ch in text if ch.isdigit())


def find(text: str) -> list[tuple[str, int, int]]:
    """``(kind, start, end)`` of each piece of personal data in ``text``, left to right, never overlapping."""
    if not text:
        return []
    found: list[tuple[str, int, int]] = []
    taken = [False] * len(text)

    def add(kind: str, start: int, end: int) -> None:
        if not any(taken[start:end]):
            found.append((kind, start, end))
            taken[start:end] = [True] * (end - start)

    for m in _EMAIL.finditer(text):
        add("email", m.start(), m.end())
    for m in _IPV4.finditer(text):
        if all(int(p) <= 255 for p in m.group().split(".")):
            add("ip", m.start(), m.end())
    for m in _IPV6.finditer(text):
        try:
            ipaddress.IPv6Address(m.group())
        except ValueError:
            continue
        add("ip", m.start(), m.end())
    for m in _CARD.finditer(text):
        if _luhn(_digits(m.group())):
            add("card", m.start(), m.end())
    for m in _PHONE.finditer(text):
        if 9 <= len(_digits(m.group())) <= 15:
            add("phone", m.start(), m.end())
    return sorted(found, key=lambda f: f[1])


def mask(text: str | None) -> tuple[str | None, list[str]]:
    """``text`` with each piece of personal data replaced by ``[kind]``, and the kinds found (in order)."""
    if not text:
        return text, []
    found = find(text)
    if not found:
        return text, []
    out, pos = [], 0
    for kind, start, end in found:
        out.append(text[pos:start])
        out.append(f"[{kind}]")
        pos = end
    out.append(text[pos:])
    return "".join(out), [kind for kind, _, _ in found]
