"""The tracking store and the only importer of mlflow: the adapter, the store probe and lock, the served model's code."""
