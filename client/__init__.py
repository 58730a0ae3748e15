"""Hospital side of MammoFL: readers, local DP training, privacy ledger, `mammofl-hospital`."""
