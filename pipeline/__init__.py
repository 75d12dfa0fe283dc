"""ResDx: a reproducible CT/MRI diagnosis pipeline (README.md; layers: core, io, sources, tracking, reporting, stages).

A regular package, not a namespace package, on purpose: loading a registered model puts the model's bundled copy
of `pipeline` on sys.path (MLflow's code_paths), and a namespace package's path follows sys.path, so every
subpackage imported after the load came from that copy (another version of the code, or a folder since removed).
"""
