"""The one error type the core raises: an errno plus a message for people.

The FUSE layer turns it into the errno the kernel would return; the daemon
log and the CLI show the message, because an errno alone rarely says which
rule was broken.
"""

import errno as _errno
import os


class CgroupError(Exception):
    """A refused operation, carrying the kernel's errno for it."""

    def __init__(self, errno: int, message: str) -> None:
        super().__init__(errno, message)
        self.errno = errno
        self.message = message

    def __str__(self) -> str:
        return f"{_errno.errorcode.get(self.errno, self.errno)}: {self.message}"

    @property
    def strerror(self) -> str:
        return os.strerror(self.errno)
