"""Federated-learning strategies (Flower) built on top of :mod:`fedmerge`."""
