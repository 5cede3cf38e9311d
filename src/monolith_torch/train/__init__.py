"""The application: the ``monolith-torch`` command, its config, the trainer, data readers, models, metrics.

The top layer: it may import every other package; nothing imports it.
"""
