"""Data on disk: verified downloads and mirrors of public datasets, the generated-dataset cache, the embedded model."""
