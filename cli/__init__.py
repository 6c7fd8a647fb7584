"""The `onnx-esvd` command: a thin Typer layer over the `onnx_esvd` library.

Installed as the package `onnx_esvd_cli` (see pyproject.toml), so no module named `cli` lands in
site-packages.
"""
