"""Files in and out: DICOM and NIfTI readers/writers, tensors, checkpoints, atomic artifact writes.

May import `pipeline.core`, `pipeline.config` and `pipeline.errors`; never a stage, MLflow or the CLI.
"""
