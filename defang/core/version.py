"""defang's version: one place, read by ``defang --version``, ``defang.__version__`` and
the package build (``[tool.setuptools.dynamic]`` in pyproject.toml)."""

VERSION = "0.1.0"
