"""Command-line support shared by every command of the project (pure Python, no jax or torch at import):
`cli_exit` (exit codes, one-line errors) and `sample_cli` (the flags and files of both sampling commands,
`flowmap_jax.sample` and `torch_ref.sample`). The commands themselves stay where users call them.
"""
