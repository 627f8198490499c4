"""The project's error type: one line for the user, an exit code for the shell."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


class Dsv3Error(Exception):
    """A problem with the input data or a runtime failure (exit code 1).

    The message is a single line that names the file or tensor and, where possible, what to do (any name in
    it that holds a newline, another control character or bytes that are not UTF-8 is shown escaped). It names
    the parameters it concerns as `{name}` (listed in `params`): `str()` shows `name`, as a program passes
    it; the command line shows its option instead (`cli.py`).
    """

    exit_code = 1

    def __init__(self, message: str, *params: str):
        self.message = printable(str(message))
        self.params = params
        super().__init__(self.naming(lambda name: name))

    def naming(self, name: Callable[[str], str]) -> str:
        """The message with each parameter called `name(parameter)`."""
        text = self.message
        for p in self.params:
            text = text.replace("{" + p + "}", name(p))
        return text


class UsageError(Dsv3Error):
    """The caller asks for something that cannot be done (exit code 2)."""

    exit_code = 2


class HeaderError(Dsv3Error):
    """A safetensors file whose header is unreadable or inconsistent."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a checkpoint, found once (by the reader or `dsv3conv.checks`) and shown by
    `inspect`, `verify` and the refusal before a conversion.

    code: a stable identifier (`shard-missing`, `fp8-unscaled`, ...); subject: the file or tensor it is about;
    message: what is wrong, naming the subject; fix: what to do about it.
    """

    code: str
    subject: str
    message: str
    fix: str = ""
    severity: str = "error"

    @property
    def text(self) -> str:
        """The one line a user reads: the problem, then the fix."""
        return f"{self.message}; {self.fix}" if self.fix else self.message

    def __str__(self) -> str:
        return self.text


def refuse(problems: list[Problem], hint: str = "") -> None:
    """Raise the first problem as the error (exit 1), counting the others; nothing when there are none."""
    if not problems:
        return
    more = f" (and {counted(len(problems) - 1, 'more problem')}{hint})" if len(problems) > 1 else ""
    raise Dsv3Error(problems[0].text + more)


def counted(n: int, one: str, many: str | None = None) -> str:
    """`n` and the words after it, singular for 1: (1, "shard") -> "1 shard", (1234, "tensor") -> "1,234 tensors",
    (n, "value is", "values are") where more than an s changes."""
    return f"{n:,} {one if n == 1 else many or one + 's'}"


def printable(text: str) -> str:
    """`text` as one printable line: newlines, control characters and undecodable bytes (the surrogate escapes
    of a non-UTF-8 file name) written as Python escapes (`\\n`, `\\x1b`, `\\udcff`); all else as it is."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def short(value: object, limit: int = 80) -> str:
    """A hostile value as it may appear in a one-line message: escaped (ascii), and cut to `limit` characters."""
    text = ascii(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
