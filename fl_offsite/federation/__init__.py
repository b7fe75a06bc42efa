"""Federated offsite-tuning on Flower: the model owner's loop, the data owner's handlers,
the wire protocol between them, and the simulation runner."""
