"""A receiver process: one of several behind one DICOM port (``dicom.receiver_processes`` > 1; issue 18).

Started by :class:`dicom_node.inbound.receivers.ReceiverPool` as ``python -m
lesiontrack.dicom_node.inbound.receiver_process``; it reads its job (settings, the inherited listening socket, its
slot) pickled from stdin, runs a :class:`dicom_node.inbound.scp.Receiver` that journals what it stores for the service
process, and stops with the service.
"""

from __future__ import annotations

import ctypes
import logging
import os
import pickle
import signal
import socket
import sys

from lesiontrack.dicom_node.inbound.receivers import SharedSlots, _ChildJob, run_dir

log = logging.getLogger(__name__)


def _die_with_parent() -> None:
    """Linux: SIGTERM as soon as the service process dies (prctl PR_SET_PDEATHSIG), so the port is free for its
    restart at once; elsewhere the receiver notices within half a second (its parent id changes)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush of a closed pipe prints nothing."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except OSError:
        pass


def _child_main() -> int:
    # SIGTERM/SIGINT are taken by sigtimedwait in the loop below, never by a Python handler: a handler that sets
    # a threading.Event can deadlock when the signal lands while this thread holds that Event's lock (a receiver
    # then never stopped and span on the listening socket). Blocked before any thread exists, so none of them
    # (pynetdicom's, the BLAS pool's) receives them either.
    stop_signals = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    parent = os.getppid()
    _die_with_parent()
    if os.getppid() != parent:  # the service died before the death signal was armed
        return 0
    job: _ChildJob = pickle.loads(sys.stdin.buffer.read())
    # imported only now, after the stop signals are blocked: importing them starts threads (BLAS pool, pynetdicom)
    # that must not receive SIGTERM/SIGINT
    from lesiontrack.config.logging import setup_logging

    setup_logging(
        logging.getLevelName(job.log_level or logging.WARNING),
        json_format=job.json_logs,
        library_level=logging.getLevelName(job.library_level),
    )
    # these too only after the stop signals are blocked (above): they start threads
    from lesiontrack.db.session import make_engine, make_session_factory
    from lesiontrack.dicom_node.inbound.journal import JournalWriter  # after the signal mask too
    from lesiontrack.dicom_node.inbound.scp import Receiver  # after the signal mask too

    try:
        engine = make_engine(job.settings.effective_database_url)
        sock = socket.socket(fileno=job.fd)
        receiver = Receiver(
            job.settings,
            make_session_factory(engine),
            JournalWriter(run_dir(job.settings)),  # no Indexer here: the service process commits the rows
            listen_socket=sock,
            slots=SharedSlots(job.slots, job.n, job.index),
        ).start()
    except Exception as exc:  # one line for the operator; the service reports that the receiver did not start
        log.error("receiver process %d could not start: %s: %s", os.getpid(), type(exc).__name__, exc)
        return 1
    try:
        sys.stdout.write(f"ready {os.getpid()}\n")
        sys.stdout.flush()
    except BrokenPipeError:  # the service stopped waiting for us (its own start failed): end quietly
        receiver.stop()
        engine.dispose()
        _silence_stdout()
        return 0
    while signal.sigtimedwait(stop_signals, 0.5) is None:
        if os.getppid() != parent:  # the service is gone: do not keep its port
            break
    receiver.stop()
    engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(_child_main())
