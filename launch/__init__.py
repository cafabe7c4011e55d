"""Distributed launch helpers: mpirun rank mapping, cluster job templates."""
