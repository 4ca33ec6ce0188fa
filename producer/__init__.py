"""The producer: turns registry files into events and events into RQ jobs on queue `nexus`."""
