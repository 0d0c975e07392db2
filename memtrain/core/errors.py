"""One error type for bad user input: scripts print its message on one line and exit non-zero."""


class MemtrainError(Exception):
    """A user-facing error whose message names the bad input and what to do."""


# The process-group timeout in force (memtrain.core.run.make_accelerator sets it), so that a
# collective that times out can be reported naming the setting to raise.
COLLECTIVE_TIMEOUT = {"minutes": None}
_TIMEOUT_WORDS = ("timed out", "timeout", "watchdog")


def collective_timeout_message(err: BaseException) -> str | None:
    """The one-line message for a distributed collective that waited past the process-group
    timeout (gloo's "Timed out waiting ...", NCCL's blocking-wait/watchdog errors), else None."""
    minutes = COLLECTIVE_TIMEOUT["minutes"]
    text = str(err).lower()
    if minutes is None or not any(word in text for word in _TIMEOUT_WORDS):
        return None
    first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
    return (f"a collective operation waited longer than timeout_minutes={minutes:g} for another process "
            f"({type(err).__name__}: {first}); if that process was still working, raise timeout_minutes "
            "(--timeout_minutes, or the recipe's timeout_minutes)")
