"""Framework integrations, imported only on request (each needs its framework installed).

* :mod:`bndoctor.integrations.lightning`: ``BNMonitorCallback`` for PyTorch Lightning.
* :mod:`bndoctor.integrations.huggingface`: ``BNMonitorTrainerCallback`` for the Hugging Face Trainer.
"""
