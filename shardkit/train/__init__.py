"""Trainers fed by the streaming loaders: local torch (``local``) and Tinker (``tinker``)."""
