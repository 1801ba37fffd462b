"""Pages people look at: the run report (``run``), the evaluation report, and what they share
(``page``: self-contained HTML, ``svg``: charts). Ray-free and torch-free."""
