"""The training engine around the attention library: config schemas, data, the trainer, checkpoints,
logging, distributed setup and the helpers that ``train.py``, ``eval.py`` and the scripts share.

Imports flow one way: ``cbam`` (attention) <- ``models`` (backbones) <- ``engine`` <- entry points and scripts.
"""
