"""The model: the GSSF similarity family, encoders and their spec, losses, checkpoints, data parallelism."""
