"""Reproductions of the seed papers' experiments (``ppl-dyn reproduce NAME``)."""

REPRODUCTIONS = {"unkelbach": "ppl_dyn.reproduce.unkelbach"}
