"""sipsniff-acc: Kamailio/OpenSER acc accounting records, produced by listening on the wire."""

__version__ = "0.1.0"

__all__ = ["__version__"]


def _count_hups_from_the_start() -> None:
    """A SIGHUP (logrotate, `systemctl reload`) in the ~0.6 s of imports before the command
    sets its handlers killed the service (SIGHUP's default action): from the first import it
    is counted instead, and acted on once the run starts. Only where nobody chose a handler."""
    import signal
    import threading

    if (hasattr(signal, "SIGHUP") and threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGHUP) is signal.SIG_DFL):
        from sipsniff_acc import stopping
        signal.signal(signal.SIGHUP, stopping._hup)  # noqa: SLF001 - the run's own counter


_count_hups_from_the_start()
