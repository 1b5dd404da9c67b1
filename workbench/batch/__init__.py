"""Batch runs: the papermill notebook runner, parameter grids (Dask), and the command line."""
