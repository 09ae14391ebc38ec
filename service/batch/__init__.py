"""Batch inference: a file or folder of inputs through the serving engine on Ray Data."""
