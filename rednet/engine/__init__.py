"""Training loop, evaluation, checkpoint IO, precision and distributed helpers.

Import the submodules directly (``from rednet.engine.trainer import Trainer``); this package
imports nothing eagerly so that ``rednet.models`` can use ``rednet.engine.checkpoint`` freely.
"""
