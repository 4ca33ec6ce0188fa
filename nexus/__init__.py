"""The `nexus` command line: recipes that wire nexus_core, producer and workers together."""
