"""Benchmarks of task signalling, each against a baseline measured in the same run.

=================  ==============================================  ==============================
benchmark          measures                                        baseline (same run)
=================  ==============================================  ==============================
``checkpoint``     ``SignalAwareTask.checkpoint()`` per call,      ``AbortableTask.is_aborted()``
                   nothing pending, inside a running task          (reads the result backend)
``throughput``     no-op ``SignalAwareTask`` runs per second on    a plain Celery task, same
                   a prefork worker (concurrency 2)                worker, alternating rounds
``cancel_latency`` cancel to stop for each step of the ladder      ``revoke(terminate=True)``
                   (database clock)                                with SIGTERM and SIGKILL
``node_cost``      CPU and PostgreSQL sessions of a worker node    a plain Celery task of the
                   at several concurrencies                        same shape
=================  ==============================================  ==============================

Each is the module of its name; ``python -m benchmarks`` finds every module here that
defines ``NAME`` and ``measure`` (``benchmarks.common.discover``): adding a benchmark is adding
its file (``docs/benchmarks.md``, "Adding one").

Run them from the project folder, with PostgreSQL and Redis up and the database migrated::

    python -m benchmarks                  # all, default sizes (about three minutes)
    python -m benchmarks --quick          # all, tiny sizes (a smoke test, figures meaningless)
    python -m benchmarks.checkpoint       # one of them; --help lists its sizes
    python -m benchmarks.report           # the latest results as Markdown tables

Each writes ``benchmarks/results/<name>.json`` (figures, environment, targets with pass or
fail) and prints a short table. Every run starts its own worker on a queue and signal
channel of its own, so it neither takes nor disturbs anybody else's tasks.
"""
