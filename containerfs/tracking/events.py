"""What the kernel tells us about tasks: fork, exec and exit, as plain numbers.

These are the only proc-connector events that change which tasks exist or which
process a task belongs to, so they are all the tracker needs. All ids are as the
initial pid namespace sees them (the connector only works there).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Fork:
    """A new task: a process, or a thread when ``child_tid != child_tgid``.

    The parent fields come from the child's ``real_parent``, which is not always
    the task that called clone():

    * new process: the forking *thread* (``parent_tid`` is its tid, which differs
      from ``parent_tgid`` when a non-main thread forked);
    * new thread (CLONE_THREAD), and likewise CLONE_PARENT: the creator's own
      real parent, i.e. the parent of the *process*, not the thread that created
      it. A new thread therefore belongs with ``child_tgid``, never with its
      parent fields.

    The event is sent before the child first runs, so it precedes every other
    event of the child.
    """

    parent_tid: int
    parent_tgid: int
    child_tid: int
    child_tgid: int


@dataclass(frozen=True, slots=True)
class Exec:
    """A task completed execve(); it is the whole process by now.

    When a non-leader thread execs, the kernel first kills every other thread.
    Each gets an Exit, the old leader's (``tid == tgid``, ``exit_signal``
    SIGCHLD) looking exactly like the end of the process. Then the exec'ing
    thread takes over the leader's id: this event reports ``tid == tgid`` and
    the thread's old tid vanishes without an Exit of its own. So an Exit of a
    leader may be followed by an Exec of the same id.
    """

    tid: int
    tgid: int


@dataclass(frozen=True, slots=True)
class Exit:
    """One task (thread) is gone; the process is gone with its last thread.

    ``exit_code`` is the kernel's ``task->exit_code`` in wait-status form
    (``status << 8`` for exit(status), the signal number for a fatal signal).
    ``exit_signal`` is the signal the parent gets (normally SIGCHLD) and -1 for
    a thread. A leader thread may exit before its other threads (its Exit has
    ``tid == tgid``) while the process lives on.
    """

    tid: int
    tgid: int
    exit_code: int
    exit_signal: int


Event = Fork | Exec | Exit
