"""Command lines the project prints for the user to paste, and the path values a user types.

A printed command goes through two parsers: the shell splits it into words, then Hydra's override
grammar reads each ``key=value``. A run folder such as ``multirun/.../0_data=digits,trainer.seed=1``
means a sweep to Hydra and ``outputs/my run`` two words to the shell, so each value is quoted for
Hydra first (only where Hydra would not read it back unchanged), and each word for the shell.
"""

from __future__ import annotations

import functools
import re
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import OverrideParseException

# Keys whose values are paths: a user's path is taken as written (see quote_path_overrides).
PATH_KEYS = ("hydra.run.dir", "hydra.sweep.dir", "ckpt", "data.root", "images", "out", "resume")

# Inside double quotes the shell still expands these.
_SHELL_LIVE = re.compile(r'[$`\\"!]')


@functools.cache
def _parser() -> OverridesParser:
    return OverridesParser.create()


def _reads_back(key: str, written: str, value: str) -> bool:
    """Whether Hydra reads ``key=written`` as the plain string ``value``."""
    try:
        override = _parser().parse_overrides([f"{key}={written}"])[0]
    except OverrideParseException:
        return False
    return not override.is_sweep_override() and override.value() == value and isinstance(override.value(), str)


def hydra_quote(value: str) -> str:
    """``value`` in single quotes as Hydra's grammar reads it: a quote escaped, and the backslashes
    before a quote or the closing quote doubled."""
    escaped = re.sub(r"(\\*)'", lambda m: m[1] * 2 + "\\'", value)
    escaped = re.sub(r"(\\+)$", lambda m: m[1] * 2, escaped)
    return f"'{escaped}'"


def hydra_value(key: str, value: Any) -> str:
    """``value`` written so that Hydra reads ``key=<it>`` back as exactly ``str(value)``."""
    text = value.as_posix() if isinstance(value, Path) else str(value)
    return text if _reads_back(key, text, text) else hydra_quote(text)


def shell_quote(word: str) -> str:
    """``word`` for a POSIX shell: as is where it is safe, else in double quotes where nothing in it
    is live there (so a Hydra-quoted value stays readable), else in shlex's single quotes."""
    quoted = shlex.quote(word)
    if quoted == word or _SHELL_LIVE.search(word):
        return quoted
    return f'"{word}"'


def override(key: str, value: Any) -> str:
    """``key=value`` as one shell word that Hydra reads back as ``value``."""
    return shell_quote(f"{key}={hydra_value(key, value)}")


def command_line(script: str, overrides: Mapping[str, Any] | None = None, **more: Any) -> str:
    """``python <script> key=value ...``, pasteable as printed: ``command_line("eval.py", ckpt=path)``;
    dotted keys go in ``overrides`` (``{"data.root": path}``)."""
    pairs = {**(overrides or {}), **more}
    return " ".join(["python", shell_quote(script), *(override(k, v) for k, v in pairs.items())])


def quote_path_overrides(argv: list[str]) -> list[str]:
    """The command line with each path value (:data:`PATH_KEYS`) that Hydra's grammar cannot read as
    written -- a non-ASCII letter, ``=`` or ``,`` of a multirun folder, a leading space -- quoted for
    it. Only values Hydra would refuse, or would strip, change: a valid sweep stays a sweep."""
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        name = key.lstrip("+~")
        if sep and name in PATH_KEYS and value and value[0] not in "'\"":
            if value != value.strip() or not _parses(arg):
                arg = f"{key}={hydra_quote(value)}"
        out.append(arg)
    return out


def _parses(arg: str) -> bool:
    try:
        _parser().parse_overrides([arg])
    except OverrideParseException:
        return False
    return True
