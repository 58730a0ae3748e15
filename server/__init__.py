"""Coordinator side of MammoFL: strategy, checkpoints, certificates, `mammofl-coordinator`."""
