"""The sample inputs shipped with pipeline: the demo's images and the commented default config.

Installed as the package ``pipeline.samples`` (see pyproject.toml), so ``pipeline demo`` and
``pipeline init`` work from any folder after ``pip install .``; in a checkout they are read here.
"""
