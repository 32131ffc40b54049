"""The ``gssf`` command: the Typer app, the flag machinery built from the stage configs, and the console."""
