"""Training: the LightningCLI (``cli.py``, behind ``python train.py``), optimiser groups and schedules
(``optim.py``), callbacks (test report, prediction writer) and exact resume (``resume.py``)."""
