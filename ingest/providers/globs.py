"""Include/exclude globs on keys (pure).

``*`` and ``?`` stay within one folder, ``**`` crosses folders; a pattern without ``/`` matches
the file name alone. Case-sensitive, like the keys themselves.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import lru_cache


@lru_cache(maxsize=256)
def _compile(pattern: str) -> re.Pattern[str]:
    out = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
            continue
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            j = pattern.find("]", i + 1)
            if j == -1:
                out.append(re.escape(c))
            else:
                body = pattern[i + 1 : j].replace("\\", "\\\\")
                if body.startswith("!"):
                    body = "^" + body[1:]
                out.append(f"[{body}]")
                i = j
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out) + r"\Z", re.DOTALL)


def matches(pattern: str, key: str) -> bool:
    target = key if "/" in pattern else key.rsplit("/", 1)[-1]
    return _compile(pattern).match(target) is not None


def compile_filter(include: list[str], exclude: list[str]) -> Callable[[str], str | None]:
    """Return a function: key → None when kept, else the reason it is skipped."""
    inc = tuple(include)
    exc = tuple(exclude)

    def check(key: str) -> str | None:
        for p in exc:
            if matches(p, key):
                return f"excluded by pattern '{p}'"
        if inc and not any(matches(p, key) for p in inc):
            return "not matched by include patterns"
        return None

    return check
