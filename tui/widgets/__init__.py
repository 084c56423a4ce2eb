"""The panels of `moed top`, one widget per module."""
