"""Running training: the one fit loop every trainer uses (epochs or steps, validation, early stopping, checkpoints
and resume), device selection, and torchrun DDP process groups.
"""
