"""The image of docker/Dockerfile, built with podman and run (see conftest.py). A package, so that its conftest does
not replace tests/conftest.py as the module `conftest` that other test files import from."""
