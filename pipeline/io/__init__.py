"""Readers and writers for DICOM and NIfTI, returning PHI-free `Volume`s."""

from pipeline.io.volume import Volume

__all__ = ["Volume"]
