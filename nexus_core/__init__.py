"""Nexus core library: configuration, registry, event log, stages, storage and models.

Nothing in this package knows about RQ; `producer/` and `workers/` wire it to the queue.
"""
