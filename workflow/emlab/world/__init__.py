"""The persona world: a labelled synthetic universe (spec in ``resources/world/``), its corpus and datasets, and a
ground-truth grader."""
