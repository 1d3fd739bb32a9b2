"""Only what pyproject.toml cannot say: recipes/ (top of the repo) installs as streaming_adapters.recipes."""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["streaming_adapters", "streaming_adapters.*"]) + ["streaming_adapters.recipes"],
    package_dir={"streaming_adapters.recipes": "recipes"},
    package_data={"streaming_adapters.recipes": ["*.yaml"]},
)
