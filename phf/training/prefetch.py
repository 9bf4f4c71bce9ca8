"""Batches prepared ahead: a background thread builds the coming steps' micro-batches while the device trains.

A step's micro-batches are a pure function of (seed, step, micro-batch index) (phf.training.trainer.host_batch), so
building them early changes nothing about which windows a step sees. The thread reads the token memmap and, for
a GPU, copies the windows into pinned (page-locked) memory, from which the training loop's `non_blocking` copies
run asynchronously: the GPU never waits for the disk or for numpy. The queue holds at most `depth` steps.

Errors in the thread reach the loop at its next `get`; `close` (also on an error or KeyboardInterrupt in the loop,
through the context manager) stops the thread and waits for it, so no thread outlives the run.
"""
from __future__ import annotations

import queue
import threading
from typing import Callable, Iterable

POLL_S = 0.1  # how often a blocked thread looks whether it was told to stop


class Prefetcher:
    """`make(step)` for every step of `steps`, in order, computed ahead in a background thread."""

    def __init__(self, make: Callable[[int], list], steps: Iterable[int], depth: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, args=(make, iter(steps)), name="phf-batches", daemon=True)
        self._thread.start()

    def _work(self, make: Callable[[int], list], steps) -> None:
        try:
            for step in steps:
                if not self._put((step, make(step), None)):
                    return
        except BaseException as exc:  # handed to the loop, which raises it
            self._put((None, None, exc))

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def get(self, step: int) -> list:
        """The micro-batches of `step` (the next one in order)."""
        while True:
            try:
                got, batches, exc = self._queue.get(timeout=POLL_S)
                break
            except queue.Empty:
                if not self._thread.is_alive():
                    raise RuntimeError("the batch-preparing thread ended without a batch for step "
                                       f"{step}") from None
        if exc is not None:
            raise exc
        if got != step:
            raise RuntimeError(f"the batch-preparing thread has step {got} where the loop asks for step {step}")
        return batches

    def close(self) -> None:
        """Stop the thread and wait for it (it finishes the batch it is building, at most)."""
        self._stop.set()
        while self._thread.is_alive():
            try:  # free the queue's slots, so that a thread blocked on a full queue sees the stop
                self._queue.get_nowait()
            except queue.Empty:
                pass
            self._thread.join(timeout=POLL_S)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class InLine:
    """The same interface as Prefetcher, building each step's batches when asked (no thread)."""

    def __init__(self, make: Callable[[int], list]):
        self._make = make

    def get(self, step: int) -> list:
        return self._make(step)

    def close(self) -> None:
        pass

    def __enter__(self) -> InLine:
        return self

    def __exit__(self, *exc) -> None:
        pass
