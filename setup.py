"""Package discovery. Metadata lives in pyproject.toml; only the package list needs code, because
`kernels/` (the ground floor, at the top of the repository) installs as `nag_lightning.kernels`
so that no top-level module named `kernels` shadows the unrelated PyPI package of that name."""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["nag_lightning", "nag_lightning.*"]),
              "nag_lightning.kernels", *(f"nag_lightning.kernels.{p}" for p in find_packages("kernels"))],
    package_dir={"nag_lightning.kernels": "kernels"},
)
