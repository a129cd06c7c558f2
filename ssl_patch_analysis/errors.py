"""A full disk said in one line: where, what was not written, what is kept, and what to do.

Every writer of the toolkit (checkpoints and resume states, analysis figures and numbers, the embedding store)
turns the operating system's bare ``[Errno 28] No space left on device`` (or torch's ``RuntimeError`` from its own
file writer) into a :class:`DiskFullError` naming the folder; the commands print it as their one line.
"""
from __future__ import annotations

import errno
from pathlib import Path


class DiskFullError(OSError):
    """The disk holding a file being written is full (an ``OSError`` with ``errno.ENOSPC``)."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ENOSPC, message)

    def __str__(self) -> str:  # the message alone, without "[Errno 28]"
        return str(self.strerror)


def is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)


def disk_full(folder: Path | str, written: str, kept: str, advice: str) -> DiskFullError:
    """``the disk holding FOLDER is full: WRITTEN was not written (KEPT); ADVICE``."""
    return DiskFullError(f"the disk holding {folder} is full: {written} was not written ({kept}); {advice}")


if __name__ == "__main__":  # a library module: python -m ssl_patch_analysis.errors says so, exit 2
    from ssl_patch_analysis.__main__ import not_a_command

    not_a_command(__spec__.name)
