"""What every command-line entry point shares: one-line errors with exit code 2, the top-level
handler for everything else, and printing file names that are not valid in the output encoding.

Exit codes: 0 success, 1 only for `compare`'s DIFFERENT verdict, 2 for every error (bad input,
bad config, a failed run, and unexpected exceptions too), 130 for an interrupted run.
Set SIAMESE_TRACEBACK=1 (or pass --verbose to the compare/embed/search/calibrate tools) to get
the traceback of an unexpected exception instead of the one-line summary.
"""
from __future__ import annotations

import _thread
import atexit
import contextlib
import os
import signal
import sys
import threading
import traceback
from typing import Callable, Optional, Sequence, Union

TRACEBACK_ENV = "SIAMESE_TRACEBACK"
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


def one_line(e: BaseException) -> str:
    """The first non-empty line of an exception's message (its type name if it has none)."""
    for line in str(e).strip().splitlines():
        if line.strip():
            return line.strip()
    return type(e).__name__


def error(message: str) -> None:
    """Prints `error: <message>` as one line on stderr (newlines folded)."""
    text = " ".join(str(message).split()) if "\n" in str(message) else str(message)
    try:
        sys.stdout.flush()
    except Exception:  # noqa: BLE001 - a closed stdout must not hide the error
        pass
    print(display(f"error: {text}", sys.stderr), file=sys.stderr, flush=True)


def fail(message: str, code: int = EXIT_ERROR):
    error(message)
    sys.exit(code)


def wants_traceback(verbose: bool = False) -> bool:
    return verbose or os.environ.get(TRACEBACK_ENV, "").strip() not in ("", "0", "false", "False")


def report_unexpected(e: BaseException, verbose: bool = False) -> None:
    """An exception that is not a known user error: its traceback if asked for, else one line + hint."""
    if wants_traceback(verbose):
        traceback.print_exception(type(e), e, e.__traceback__, file=sys.stderr)
    error(f"{type(e).__name__}: {one_line(e) if str(e).strip() else 'no message'} "
          f"(unexpected; set {TRACEBACK_ENV}=1 for the traceback)")


class StoppedBySignal(KeyboardInterrupt):
    """SIGTERM/SIGINT stopped a training loop at a step every process agreed on, where all saved one
    checkpoint together (raised by `train`): every process leaves the same way, a normal exit through
    JAX's shutdown barrier, which each reaches. After a lone interrupt one process leaves at once
    (`exit_process`); leaving so while another process still saves would abort that one."""


# The signals that stop a command or an entry point as a Ctrl-C does (one line, exit 130, no
# half-written file): SIGTERM too (`timeout`, a scheduler ending a job), which was Python's default,
# exit -15 and no word.
INTERRUPTS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def interrupts_stop(signals: Sequence[int] = (signal.SIGINT,)):
    """While inside, each of `signals` is a KeyboardInterrupt that does stop the work (SIGTERM's
    message "terminated"). Python's own SIGINT handler raises it wherever the main thread is, also
    inside a garbage-collection callback (jax's, which runs at every collection) or a `__del__`,
    where Python prints it as "Exception ignored in ... KeyboardInterrupt" and goes on: a Ctrl-C
    in the first second of `siamese-calibrate` (importing jax collects often) printed 6 lines of
    traceback, then the command wrote its output and exited 0 (the kill review of 2026-12-07). Such
    an interrupt is raised again 1 ms later (SIGALRM), outside; where there is no SIGALRM (Windows), a
    timer thread interrupts the main thread instead. A signal that is ignored (a job
    started with `nohup ... &`) or handled by someone else stays so; off the main thread, nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    again = []  # the message of an interrupt that was swallowed
    alarms = hasattr(signal, "setitimer") and hasattr(signal, "SIGALRM")
    timers = []  # without SIGALRM: the threads that interrupt the main thread again

    def interrupt(signum, frame):
        if again:  # (raised again by a timer thread, as a SIGINT)
            raise KeyboardInterrupt(again.pop())
        raise KeyboardInterrupt("terminated" if signum == signal.SIGTERM else "")

    def alarm(signum, frame):
        if again:
            raise KeyboardInterrupt(again.pop())

    previous_hook = sys.unraisablehook

    def unraisable(u):
        if u.exc_type is not None and issubclass(u.exc_type, KeyboardInterrupt):
            again[:] = [str(u.exc_value or "")]
            if alarms:
                signal.setitimer(signal.ITIMER_REAL, 0.001)
            else:
                timers.append(threading.Timer(0.001, _thread.interrupt_main, (signal.SIGINT,)))
                timers[-1].daemon = True
                timers[-1].start()
            return
        previous_hook(u)

    ours = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
    extra = []
    if alarms:
        ours[signal.SIGALRM] = signal.SIG_DFL
        extra = [(signal.SIGALRM, alarm)]
    previous = {}
    for sig, handler in [(s, interrupt) for s in signals] + extra:
        if signal.getsignal(sig) is ours.get(sig):  # Python's default, not ignored nor someone else's
            previous[sig] = signal.signal(sig, handler)
    # Raising a swallowed interrupt again needs our SIGALRM handler, or (no SIGALRM) our SIGINT one.
    again_here = (signal.SIGALRM in previous) if alarms else (signal.SIGINT in previous)
    if again_here:
        sys.unraisablehook = unraisable
    try:
        yield
    finally:
        if again_here:
            if alarms:
                signal.setitimer(signal.ITIMER_REAL, 0)
            for timer in timers:
                timer.cancel()
            if sys.unraisablehook is unraisable:
                sys.unraisablehook = previous_hook
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def interrupt_behind(e: BaseException) -> Optional[KeyboardInterrupt]:
    """The KeyboardInterrupt that `e` was raised in the course of (anywhere along its __cause__ and
    __context__ chains), or None. A Ctrl-C that lands inside C code comes out as a SystemError ("...
    returned a result with an exception set") caused by it, and a handler that read that as a user
    error named the interrupt wrongly: `compare` interrupted while it loaded the shipped model said
    "its config does not describe a buildable model" with exit code 2 (the port review of 2026-12-07)."""
    stack, seen = [e], set()
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, KeyboardInterrupt):
            return e
        stack += [e.__cause__, e.__context__]
    return None


def guarded(fn: Callable[[], Optional[int]],
            user_errors: Union[Sequence[type], Callable[[], Sequence[type]]] = (), verbose: bool = False,
            signals: Sequence[int] = (signal.SIGINT,)) -> int:
    """Runs `fn()` and returns its exit code; every exception becomes one line and code 2 (130 for
    an interrupt: `signals`, see `interrupts_stop`). `user_errors` (or a function giving them,
    called in here: their imports take a second, in which a Ctrl-C is an interrupt too) are
    reported as their own message, others with a hint."""
    done = []  # the exit code, once the work (or its report) is over
    try:
        with interrupts_stop(signals):
            done.append(_guarded(fn, user_errors, verbose))
    except KeyboardInterrupt as e:
        # Between the end of the work and the handlers' restoration (`interrupts_stop`'s exit): it
        # escaped as a 20-line traceback with exit -2 (the leftovers review of stop 55). The work's
        # own code when it was over; otherwise an interrupt as any other.
        if done:
            return done[0]
        error(str(e) or "interrupted")
        return EXIT_INTERRUPTED
    return done[0]


def _guarded(fn, user_errors, verbose) -> int:
    """`guarded`'s handler, inside `interrupts_stop`."""
    errors: tuple = ()
    try:
        errors = tuple(user_errors() if callable(user_errors) else user_errors)
        code = fn()
        return 0 if code is None else int(code)
    except SystemExit:  # (`fail`: the process ends, not through `exit_process`; its hold all the same)
        _hold_a_ctrl_c_at_exit()
        raise
    except StoppedBySignal as e:
        print(str(e), file=sys.stderr)
        # (a normal exit, through jax's shutdown barrier: not `exit_process`, but its hold of a
        # Ctrl-C in the clean-up too, where the user's second press after a stopped training fell)
        _hold_a_ctrl_c_at_exit()
        sys.exit(EXIT_INTERRUPTED)
    except KeyboardInterrupt as e:
        error(str(e) or "interrupted")
        return EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001 - the top-level handler
        interrupt = interrupt_behind(e)
        if interrupt is not None:  # a Ctrl-C, whatever it was turned into on its way here
            error(str(interrupt) or "interrupted")
            return EXIT_INTERRUPTED
        if not isinstance(e, errors):
            report_unexpected(e, verbose)
            return EXIT_ERROR
        if wants_traceback(verbose):
            traceback.print_exception(type(e), e, e.__traceback__, file=sys.stderr)
        error(one_line(e))
        return EXIT_ERROR


def expand_home(argv: Sequence[str]) -> list[str]:
    """`--flag=~/path` as the shell gives `--flag ~/path`: bash expands a `~` that starts a word, not
    one after `--flag=`, so `--workdir=~/runs/a` trained into a folder named `~` in the current
    directory (and `rm -rf ~` is how one removes it). `--data_dir=~/data` was expanded already."""
    out = []
    for arg in argv:
        name, eq, value = arg.partition("=")
        out.append(f"{name}={os.path.expanduser(value)}" if arg.startswith("-") and eq and value.startswith("~") else arg)
    return out


def _hold_a_ctrl_c_while_exiting():
    """An atexit callback (registered last by `exit_process`, so run first): while the other atexit
    callbacks run, a first Ctrl-C is let go instead of raised. Python's handler raised it inside
    jax's clean-up (`clear_backends`, ~10 ms after a command's last line), which Python prints as
    "Exception ignored in atexit callback" and 9 lines of traceback, after the work was done and with
    its exit code (the leftovers review of stop 55). A second Ctrl-C ends the process at once with
    130, so that a clean-up that hangs still stops on Ctrl-C (why ignoring it was not taken at stop
    50). A handler that is not Python's own (ignored, a user's) is left alone."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        return
    held = []

    def let_go_once(signum, frame):
        if held:
            _flush_output()
            os._exit(EXIT_INTERRUPTED)
        held.append(signum)

    signal.signal(signal.SIGINT, let_go_once)


def exit_process(code: int):
    """Ends the process with `code`. A failed process of a multi-process job (jax.distributed
    initialised) leaves at once with os._exit: its peers wait in a collective for it, and jax's
    atexit shutdown would wait for them in a barrier for 300 s, then abort every process with a C++
    stack dump. Leaving at once ends the peers' collectives within seconds and keeps this exit code.
    A Ctrl-C while the process is only exiting (its atexit clean-up) is no traceback
    (`_hold_a_ctrl_c_while_exiting`)."""
    jax = sys.modules.get("jax")  # (not imported here: the CLIs' start-up stays light)
    if code and jax is not None and jax.distributed.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    _hold_a_ctrl_c_at_exit()
    sys.exit(code)


def _hold_a_ctrl_c_at_exit():
    """Registers `_hold_a_ctrl_c_while_exiting` as the last atexit callback (the last registered runs first)."""
    atexit.unregister(_hold_a_ctrl_c_while_exiting)
    atexit.register(_hold_a_ctrl_c_while_exiting)


def display(text: str, stream=None) -> str:
    """`text` made printable on `stream` (default stdout): file names with bytes that are not valid
    UTF-8 (kept by Python as surrogate escapes) or not encodable come out as backslash escapes."""
    stream = stream or sys.stdout
    encoding = getattr(stream, "encoding", None) or "utf-8"
    try:
        text.encode(encoding)
        return text
    except UnicodeEncodeError:
        pass
    try:  # surrogate escapes back to the file name's own bytes, shown as \xNN
        return text.encode(encoding, "surrogateescape").decode(encoding, "backslashreplace")
    except UnicodeEncodeError:
        return text.encode(encoding, "backslashreplace").decode(encoding)


class _ReaderMayLeave:
    """sys.stdout / sys.stderr of a command whose reader may close the pipe early (`siamese-search
    ... | head -1`, `siamese-train ... 2>&1 | head -3`). Python ignores SIGPIPE, so the next write
    raised BrokenPipeError: `error: [Errno 32] Broken pipe` and exit 2 after the work was done (the
    index written, the training finished), or a traceback and exit 1. Here the stream's file
    descriptor is pointed at /dev/null instead and the write done again: the rest of the output goes
    nowhere and the command ends as it would have, with its own exit code (compare's verdict too),
    as quietly as a Unix tool. Any other write error (a full disk: /dev/full) is raised as before."""

    def __init__(self, stream):
        self._stream = stream

    def _retry_into_devnull(self, method, *args):
        try:
            return getattr(self._stream, method)(*args)
        except BrokenPipeError:
            devnull = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(devnull, self._stream.fileno())
            finally:
                os.close(devnull)
            return getattr(self._stream, method)(*args)

    def write(self, text):
        return self._retry_into_devnull("write", text)

    def flush(self):
        return self._retry_into_devnull("flush")

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _flush_output():
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, _ReaderMayLeave):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 - at exit; the interpreter reports a failing flush itself
                pass


def _reader_may_leave(stream) -> bool:
    """Whether `stream` is a `_ReaderMayLeave` or a wrapper around one: the CLIs' stderr goes into
    checkpoints' filter next (`install_stderr_filter`), so a second command in the same process
    found no `_ReaderMayLeave` on top, wrapped again, and so did the filter: two layers a call, and
    after ~250 calls every write to stderr was a RecursionError."""
    seen = set()
    while stream is not None and id(stream) not in seen:
        if isinstance(stream, _ReaderMayLeave):
            return True
        seen.add(id(stream))
        stream = getattr(stream, "__dict__", {}).get("_stream")  # (not __getattr__: the wrapped stream's)
    return False


def quiet_when_reader_leaves() -> None:
    """For command-line processes: sys.stdout and sys.stderr write into /dev/null once their pipe's
    reader has gone (`_ReaderMayLeave`), up to the interpreter's last flush at exit."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not _reader_may_leave(stream):
            setattr(sys, name, _ReaderMayLeave(stream))
    atexit.unregister(_flush_output)
    atexit.register(_flush_output)  # before the interpreter's own flush, which would report the EPIPE
