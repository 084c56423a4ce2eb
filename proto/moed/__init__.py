"""moed protocol, version 1."""
