"""Reproductions of the seed papers' experiments (``ppl-dyn reproduce NAME``)."""

REPRODUCTIONS = {
    "unkelbach": "ppl_dyn.reproduce.unkelbach",
    "ghahramani": "ppl_dyn.reproduce.ghahramani",
    "comparison": "ppl_dyn.reproduce.comparison",
}
