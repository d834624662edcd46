"""Efficient verification: two-stage annealing runs of the proxy decide which candidate data pools to keep."""
