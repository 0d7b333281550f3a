"""flashcore-deploy: the validation pipeline that runs the parity suite on a GPU host over SSH (or locally).

One run function (`pipeline.steps.run_host`) behind two shells (`pipeline.cli` and the repository's
`fabfile.py`). Pure command builders live in `commands`, pure parsers in `parse`, and `remote` is the only
module that touches a connection.
"""

__all__ = ["__version__"]
__version__ = "0.1.0"
