"""`moed top`, the Textual monitor."""
