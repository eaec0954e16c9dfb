"""Judges: every backend turns sample rows into grade rows of one schema (see :mod:`emlab.judge.schema`)."""
