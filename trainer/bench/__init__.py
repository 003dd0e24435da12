"""Tools that measure the trainer, each run as ``python -m trainer.bench.<tool>`` (the ``make bench*`` and
``make gpu-suite`` targets):

* ``gnp``: time of a GNP step vs an SGD step on synthetic data (``make bench-gnp``);
* ``e2e``: the real training loop end to end vs that step (``make bench-e2e``);
* ``data``: data loading alone, FFCV vs torchvision (``make bench-data``);
* ``gpu_checks``: GNP on the accelerator equals the CPU fp64 steps; low-precision and DDP sanity;
* ``gpu_suite``: all of the above plus ``trainer compare`` in one budgeted run on a lent GPU.

Tools import the core (``trainer.optim``, ``trainer.data``, ...); the core never imports a tool
(tests/test_train.py::test_import_direction).
"""
