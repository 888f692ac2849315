"""Read-ahead: run a decoder in a background thread, handing frames over a bounded queue.

:class:`~hms_deploy.data.frame_source.FrameSource` walks the bitstream forward to every wanted
frame whatever the consumer does with it, so that walk can run *ahead* of the consumer
while the consumer computes (PyAV releases the GIL in ``av_read_frame``,
``avcodec_send_packet``/``avcodec_receive_frame`` and ``sws_scale``; ONNX Runtime and
torch release it in their kernels). :class:`ReadAhead` is the generic piece: an iterator
whose items are produced by another iterator in a daemon thread.

Guarantees:

- **Same items, same order, same errors.** The consumer sees exactly what iterating the
  source directly would give; an exception raised by the source is re-raised in the
  consumer, once, after the items produced before it.
- **Bounded memory.** The produced-but-not-consumed items weigh at most ``capacity``
  (each item weighs 1, or what ``weight(item)`` says; an item of weight 0, e.g. a
  marker that holds no frame, never fills the queue); the producer waits while the
  queue is full.
- **Pauses where the consumer will not continue.** ``pause_after(item)`` (evaluated in
  the producer thread) may say that the consumer will not want the items after this
  one (e.g. it is about to seek); the producer then waits until the consumer asks for
  more with an empty queue, or closes. It only saves work: when the prediction is wrong,
  the consumer's next ``next()`` resumes the producer and gets the same items.
- **Lazy start.** The thread starts on the first ``next()`` (or :meth:`ReadAhead.start`):
  a source nobody reads is never touched (an ``audio-only`` run opens no decoder thread).
- **Clean shutdown.** :meth:`ReadAhead.close` (early stop, a seek, an error in the
  consumer, ``with`` exit) wakes the producer, drops the queued items, closes the source
  *in the producer thread* (a generator's ``finally`` runs there) and joins it. After
  ``close`` returns the source is no longer touched, so its resources (a container) can
  be closed or seeked by the caller. A handle that is garbage-collected unclosed stops
  its producer too (the thread holds no reference to the handle).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")

_END = object()


class _Channel:
    """What the producer thread and the consumer share (never the consumer's handle)."""

    def __init__(self, capacity: int, weight: Callable[[object], int] | None = None):
        self.capacity = capacity
        self.weight = weight
        self.load = 0  # total weight of the queued items
        self.items: deque[tuple[object, int]] = deque()
        self.cond = threading.Condition()
        self.stopped = False  # set by the consumer: stop producing
        self.done = False  # set by the producer: the source ended or failed
        self.error: BaseException | None = None
        self.paused = False  # the producer waits for demand (pause_after said so)
        self.wanting = False  # the consumer waits on an empty queue


def _produce(
    channel: _Channel, source: Iterable[object], pause_after: Callable[[object], bool] | None
) -> None:
    it = iter(source)
    error: BaseException | None = None
    try:
        while True:
            with channel.cond:
                while channel.load >= channel.capacity and not channel.stopped:
                    channel.cond.wait()
                if channel.stopped:
                    return
            item = next(it, _END)  # the work (decoding) happens outside the lock
            if item is _END:
                return
            w = 1 if channel.weight is None else max(0, int(channel.weight(item)))
            with channel.cond:
                if channel.stopped:
                    return
                channel.items.append((item, w))
                channel.load += w
                channel.cond.notify_all()
            if pause_after is not None and pause_after(item):
                with channel.cond:
                    channel.paused = True
                    while not channel.stopped and not (channel.wanting and not channel.items):
                        channel.cond.wait()
                    channel.paused = False
                    if channel.stopped:
                        return
    except BaseException as e:  # noqa: BLE001 - handed to the consumer, re-raised there
        error = e
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            try:
                close()  # a generator's cleanup runs in the thread that ran it
            except BaseException as e:  # noqa: BLE001
                error = error or e
        with channel.cond:
            channel.done = True
            channel.error = error
            channel.cond.notify_all()


class ReadAhead(Generic[T]):
    """Iterate ``source`` in a background thread, at most ``capacity`` items ahead
    (``weight``: what one item counts for, default 1 each; see the module docstring).

    Use as an iterator; call :meth:`close` (or use ``with``) when done. ``name`` names
    the thread (``threading.enumerate()`` shows it while it runs).
    """

    def __init__(
        self,
        source: Iterable[T],
        capacity: int,
        *,
        name: str = "hms-read-ahead",
        pause_after: Callable[[T], bool] | None = None,
        weight: Callable[[T], int] | None = None,
    ):
        if capacity < 1:
            raise ValueError(f"read-ahead capacity must be >= 1, got {capacity}")
        self._source: Iterable[T] | None = source
        self._channel = _Channel(int(capacity), weight)  # type: ignore[arg-type]
        self._thread: threading.Thread | None = None
        self._closed = False
        self._pause_after = pause_after
        self.name = name

    @property
    def capacity(self) -> int:
        return self._channel.capacity

    @property
    def running(self) -> bool:
        """Whether the producer thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def __iter__(self) -> Iterator[T]:
        return self

    def __next__(self) -> T:
        if self._closed:
            raise StopIteration
        ch = self._channel
        self.start()
        with ch.cond:
            while not ch.items and not ch.done:
                ch.wanting = True
                ch.cond.notify_all()  # wakes a paused producer
                ch.cond.wait()
            ch.wanting = False
            if ch.items:
                item, w = ch.items.popleft()
                ch.load -= w
                ch.cond.notify_all()
                return item  # type: ignore[return-value]
            error, ch.error = ch.error, None
        if error is not None:
            raise error
        raise StopIteration

    def start(self) -> None:
        """Start the producer now instead of on the first ``next()`` (no-op once started
        or closed)."""
        if self._thread is not None or self._closed:
            return
        self._thread = threading.Thread(
            target=_produce, args=(self._channel, self._source, self._pause_after),
            name=self.name, daemon=True,
        )
        self._source = None  # the thread owns it now
        self._thread.start()

    def close(self) -> None:
        """Stop the producer, drop queued items, wait until the source is closed."""
        self._closed = True
        ch = self._channel
        with ch.cond:
            ch.stopped = True
            ch.items.clear()
            ch.load = 0
            ch.cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None
        if self._source is not None:  # never started: close the source here
            close = getattr(self._source, "close", None)
            self._source = None
            if close is not None:
                close()

    def __enter__(self) -> ReadAhead[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        ch = getattr(self, "_channel", None)
        if ch is not None:  # no join here: only tell the producer to stop
            with ch.cond:
                ch.stopped = True
                ch.items.clear()
                ch.load = 0
                ch.cond.notify_all()
