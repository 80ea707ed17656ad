"""`make bench`: embedfill measured against the machine's limits and the obvious alternative."""
