"""Tools that compare training runs: ``compare`` (``python -m trainer compare``: methods x seeds on one recipe,
then a table and a plot) and ``plot`` (``python -m trainer plot``: the curves of run directories on one figure).

Tools import the core (``trainer.config``, ``trainer.loop``, ...); the core never imports a tool
(tests/test_train.py::test_import_direction).
"""
