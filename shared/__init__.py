"""Contracts shared by the gateway and the worker: request model, envelope, topology, settings, errors."""
