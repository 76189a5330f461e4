"""``medlite sweep``: build many variants of one recipe, score them, and recommend one per device.

* :mod:`.spec` — the sweep file (typed, closed; every error at once with its YAML path) and its
  variants (the product of the axes and/or an explicit list; a variant that breaks a recipe rule is
  listed as invalid with the rule's message, never built);
* :mod:`.variant` — one variant in a worker (the normal build pipeline, so artifacts, gates and the
  stage-output cache are shared) and its row, read back from the artifact's own files;
* :mod:`.executors` — ``local`` (``--jobs N`` processes, each with its own thread budget) and ``ray``;
* :mod:`.results` — the table (CSV / JSON / Markdown), the Pareto front and the recommendations;
* :mod:`.plot` — accuracy vs device memory (PNG, matplotlib); :mod:`.commands` — the CLI handler.
"""
