"""The one error path of every entry point (ground floor: the standard library only, so `--help` and bad flags
answer before torch or MediaPipe load). Not a box of the paper's figure.

* `UsageError`: bad user input; `run_cli` turns it into one line on stderr and exit code 2 (no traceback). A full
  disk or a file-size limit becomes such a line too, naming the path and the free space there; Ctrl-C and
  SIGTERM end in one line and exit code 130 after the `finally` blocks have removed temporary files.
* `ArgumentParser`: argparse whose errors are UsageErrors (one line, not a usage block).
* Flag types that check a value before any work starts: `int_flag`, `float_flag`, `odd_window`, `seed_flag`.
* `process_pool`: worker processes that end with their parent however it ends, and leave Ctrl-C to it.
* `print_rows`: an entry point's measures as a plain table on stdout.
"""
from __future__ import annotations

import argparse
import errno
import math
import os
import ctypes
import multiprocessing
import shutil
import signal
import sys
import threading
import time

SEED_LIMIT = 2**64  # torch generators take seeds in [0, 2^64)
DISK_ERRORS = {errno.ENOSPC: "the disk is full", errno.EFBIG: "the file is larger than allowed",
               errno.EDQUOT: "the disk quota is used up"}


class UsageError(Exception):
    """Bad user input: the CLI prints the message as one line and exits with code 2 (see `run_cli`)."""


def disk_error(path: str, err: OSError) -> UsageError:
    """A UsageError for a failed write: what went wrong, where, and how much space is free there."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        free = f"{shutil.disk_usage(folder).free / 2**20:.0f} MB free in {folder}"
    except OSError:
        free = f"{folder} cannot be read"
    reason = DISK_ERRORS.get(err.errno, err.strerror or type(err).__name__)
    return UsageError(f"cannot write {path}: {reason} ({free}); free some space or choose another output path")


def _terminate(signum, frame):
    raise KeyboardInterrupt  # SIGTERM unwinds like Ctrl-C, so every `finally` and `with` cleans up


def run_cli(main) -> None:
    """Run a CLI entry point: a UsageError, or an out-of-space / file-size write error, becomes one line on stderr
    and exit code 2; Ctrl-C or SIGTERM (outside a training loop, which saves a checkpoint itself) one line and
    exit code 130."""
    previous, ending = signal.signal(signal.SIGTERM, _terminate), False
    try:
        main()
    except SystemExit as stop:  # train.py's own exit after saving the checkpoint a signal asked for
        ending = stop.code == 130
        raise
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except OSError as err:
        if err.errno not in DISK_ERRORS:
            raise
        print(f"error: {disk_error(err.filename or 'the output', err)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        ending = True
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    finally:  # a process ending on a signal ignores repeats of it while it shuts down (torchrun forwards the
        # signal its workers got already), so that it still exits with 130 rather than being killed by the repeat
        signal.signal(signal.SIGTERM, signal.SIG_IGN if ending else previous)
        if ending:
            signal.signal(signal.SIGINT, signal.SIG_IGN)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: a bad flag raises UsageError instead of printing the usage block."""

    def error(self, message):
        raise UsageError(f"{message}; see {self.prog} --help")


def int_flag(low: int, high: int | None = None):
    """An argparse type: an integer in [low, high]."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low or (high is not None and value > high):
            bound = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"{value} is out of range; give an integer {bound}")
        return value
    return parse


def float_flag(text: str) -> float:
    """An argparse type: a finite number (NaN and infinity are refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number")
    return value


def nonnegative_float(text: str) -> float:
    """An argparse type: a finite number >= 0."""
    value = float_flag(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative; give 0 or more")
    return value


def odd_window(text: str) -> int:
    """An argparse type: 0 (off) or an odd window length."""
    value = int_flag(0)(text)
    if value > 1 and value % 2 == 0:
        raise argparse.ArgumentTypeError(f"{value} is even; give an odd window (or 0 for off)")
    return value


def seed_flag(text: str) -> int:
    """An argparse type: a seed in [0, 2^64)."""
    return int_flag(0, SEED_LIMIT - 1)(text)


# ------------------------------------------------------------------------------------------------------------
# Worker processes that end with their parent
# ------------------------------------------------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent() -> bool:
    """Linux: have the kernel send this process SIGTERM when its parent dies, however it dies (a SIGKILL runs
    no handler, so the parent cannot stop its workers itself). False where prctl is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent: int) -> None:
    """Fallback without prctl: a worker idle in the pool's queue never notices a dead parent (it holds both ends
    of the pipes), so poll: once the parent is gone the worker has been re-parented."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def worker_init(parent: int, then=None, *args) -> None:
    """Pool initializer: end with the parent process `parent`; leave Ctrl-C to the parent, which terminates the
    pool (else every worker prints its own KeyboardInterrupt traceback); then call then(*args) if given."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not _die_with_parent():
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    if os.getppid() != parent:  # the parent died before prctl took effect: no signal will come
        os._exit(1)
    if then is not None:
        then(*args)


def process_pool(workers: int, then=None, *args):
    """A spawn-context multiprocessing.Pool of `workers` processes started by worker_init (then(*args) in each)."""
    return multiprocessing.get_context("spawn").Pool(workers, worker_init, (os.getpid(), then, *args))


def print_rows(rows: dict) -> None:
    """{name: {measure: value}} as a table on stdout, a column per measure any row has (- where a row lacks it)."""
    keys = list(dict.fromkeys(k for r in rows.values() for k in r))  # every row's keys, first seen first
    widths = [max(len(k), 8) + 2 for k in keys]
    print(f"{'':<16}" + "".join(f"{k:>{w}}" for k, w in zip(keys, widths)))
    for name, r in rows.items():
        print(f"{name:<16}" + "".join(f"{r[k]:>{w}.3f}" if isinstance(r.get(k), float) else f"{r.get(k, '-'):>{w}}"
                                      for k, w in zip(keys, widths)))
