"""Task signalling for Celery: cancel, pause, resume (and your own signals) for running tasks.

A producer writes a :class:`~tasksignal.models.CeleryTaskSignal` row (the durable truth);
after commit a Redis notification wakes the worker process that runs the task within
milliseconds; the task reacts at its next ``self.checkpoint()``. A task that does not is
interrupted after ``cancel_grace`` seconds and, if still running ``kill_after`` seconds
after the cancel, killed in isolation by its worker's main process. See ``base.py``.
"""
