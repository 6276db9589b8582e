"""Run a command line of tinytf and kill it with SIGKILL just before its K-th change to the file system.

    python tests/crash_at.py K COUNT_FILE -m tinytf.train --out ...      (K = 0: never; the run completes)
    python tests/crash_at.py K COUNT_FILE -c "python code"

A change is a call of os.mkdir, os.rename, os.replace, os.link, os.unlink, os.rmdir, os.fsync or os.ftruncate, an
os.open that may create or truncate, or an open() for writing; between two of them a process only computes and
writes into files it has opened. Killing the process before each change in turn, K = 1, 2, ..., leaves every state
the disk passes through from one change to the next (the page cache survives a killed process, so a write that
returned is as good as done; a kill inside a write is what the random-moment kills of the tests are for). At exit
the process writes the number of changes it made to COUNT_FILE: the values of K there are to try.
"""

import builtins
import io
import os
import runpy
import signal
import sys

kill_at, count_file = int(sys.argv[1]), sys.argv[2]
changes = 0
unpatched_open = io.open


def counted(function):
    def change_then_maybe_die(*args, **kwargs):
        global changes
        changes += 1
        if changes == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return function(*args, **kwargs)

    return change_then_maybe_die


def counted_open(function):
    change = counted(function)

    def open_maybe_for_writing(file, mode="r", *args, **kwargs):
        writes = any(flag in mode for flag in "wax+")
        return (change if writes else function)(file, mode, *args, **kwargs)

    return open_maybe_for_writing


def counted_os_open(function):
    change = counted(function)

    def os_open_maybe_creating(path, flags, *args, **kwargs):
        creates = flags & (os.O_CREAT | os.O_TRUNC)
        return (change if creates else function)(path, flags, *args, **kwargs)

    return os_open_maybe_creating


for name in ("mkdir", "rename", "replace", "link", "unlink", "rmdir", "fsync", "ftruncate"):
    setattr(os, name, counted(getattr(os, name)))
os.open = counted_os_open(os.open)
builtins.open = io.open = counted_open(io.open)


def report_changes():
    with unpatched_open(count_file, "w") as file:
        file.write(str(changes))


if sys.argv[3] == "-m":
    sys.argv = [sys.argv[4], *sys.argv[5:]]
    try:
        runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
    finally:
        report_changes()
else:
    code, sys.argv = sys.argv[4], ["-c", *sys.argv[5:]]  # as `python -c CODE ARGS` sets it
    try:
        exec(compile(code, "<crash_at -c>", "exec"), {"__name__": "__main__"})
    finally:
        report_changes()
