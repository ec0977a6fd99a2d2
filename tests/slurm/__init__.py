"""Tests against a real single-node SLURM cluster (see conftest.py). A package, so that its conftest does
not replace tests/conftest.py as the module `conftest` that other test files import from."""
