"""Errors the user can fix: they carry one line naming the file or option and the problem."""

from __future__ import annotations

import re
from pathlib import Path

_LONG_NUMBER = re.compile(r"\d{41,}")
# Python's message for int("<more than 4300 digits>"), from any parser (JSON, YAML, the command line).
_INT_DIGITS = re.compile(r"Exceeds the limit \((\d+) digits\) for integer string conversion[^;]*?(\d+) digits; "
                         r"use sys\.set_int_max_str_digits\(\) to increase the limit")


def readable(text: str) -> str:
    """``text`` with every run of more than 40 digits cut to its first digits and its length, and
    Python's integer-size message in plain words."""
    text = _INT_DIGITS.sub(lambda m: f"a number of {m[2]} digits; at most {m[1]} digits are read", text)
    return _LONG_NUMBER.sub(lambda m: f"{m.group()[:6]}...({len(m.group())} digits)", text)


class SynomalyError(Exception):
    """Base class of user-facing errors; the CLI prints ``str(error)`` and exits with ``exit_code``."""

    exit_code = 2


class InputError(SynomalyError, ValueError):
    """An input file or folder cannot be used.

    Args:
        path: The offending file or folder.
        problem: What is wrong with it, in a few words.
    """

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = Path(path)
        self.problem = readable(problem)
        super().__init__(f"{path}: {self.problem}")


class ConfigError(SynomalyError, ValueError):
    """An option or configuration value is out of range or inconsistent.

    Args:
        option: The option's name, e.g. ``detect.threshold``.
        problem: What is wrong with it.
    """

    def __init__(self, option: str, problem: str) -> None:
        self.option = option
        self.problem = readable(problem)
        super().__init__(f"{option}: {self.problem}")


class OutputExistsError(SynomalyError, FileExistsError):
    """An output already exists and overwriting was not asked for.

    Args:
        path: The existing output.
        hint: How to proceed, e.g. which option allows overwriting.
    """

    def __init__(self, path: str | Path, hint: str = "pass overwrite=True (--overwrite) to replace it") -> None:
        self.path = Path(path)
        super().__init__(f"{path}: already exists; {hint}")


class OutputError(SynomalyError, OSError):
    """An output cannot be written: its folder is a file or sits under one, is read-only, or the disk is full.

    Args:
        path: The output file or folder.
        problem: What is wrong, in a few words.
    """

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


class Interrupted(SynomalyError):
    """A run stopped by a signal (SIGTERM from a batch scheduler, SIGINT); its finished work is kept.

    Args:
        what: What stopped and where, e.g. ``train stopped at step 120 of 1500 by SIGTERM``.
        hint: How to continue.
    """

    exit_code = 143  # 128 + SIGTERM, what schedulers expect of a terminated job

    def __init__(self, what: str, hint: str) -> None:
        super().__init__(f"{what}; {hint}")


class TrainingDiverged(SynomalyError):
    """The loss became NaN or infinite: the run stops, and no model folder is written from it."""

    def __init__(self, step: int, loss: float) -> None:
        self.step, self.loss = step, loss
        super().__init__(f"train.lr: the loss became {loss} at step {step} (training diverged), so no model was written; "
                         "lower --train.lr (or check the images) and train again with --overwrite")
