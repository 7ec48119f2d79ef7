"""Imported (first) by a stage's fork server: the kernel then kills the fork server when the stage process that
started it dies, and with it every worker it forked (each worker also asks for this: ``parallel._limit_threads``).
Without it a ``kill -9`` of ``bertpipe shard --workers 2`` left the fork server and its workers running."""

from data_prep.parallel import _die_with_parent

_die_with_parent()
