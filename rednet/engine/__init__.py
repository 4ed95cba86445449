"""What runs a model: the run context (device, DDP, precision, batch per rank, run folder), a trained
model from a file checked against the data, the training loop with its checkpoints, evaluation, and
the optimiser, precision and distributed helpers. Import the submodules directly
(``from rednet.engine.trainer import Trainer``)."""
