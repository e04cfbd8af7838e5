"""cellspot: turn crowd clicks on microscopy images into trustworthy cell datasets and models."""

__version__ = "0.1.1"
