"""User-facing errors: the CLI prints these as one clear message and exits non-zero, without a traceback."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user (missing file, impossible setting). The message names the key/file and the fix."""

    exit_code = 1


class ConfigError(UserError):
    """Every problem found in a preset, gathered so the user fixes them all at once."""

    exit_code = 2

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = list(problems)
        self.source = source
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s) in {source}:\n{lines}")
