"""Fault-injection and abuse suite (issue #8): see docs/faults.md."""
