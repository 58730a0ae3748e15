"""One-machine federations for researchers: partitions of public data, baselines, `mammofl-sim`."""
