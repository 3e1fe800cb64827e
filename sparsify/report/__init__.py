"""Reports: `build` (a run's or a checkpoint's layers, summary, history and rounds as data),
`render` (table, JSON, CSV, markdown), `html` (one self-contained page), `series`/`plots`/`figures`
(the figures, with the `[plot]` extra), `publish` (`sparsify report` end to end) and `check` (does a
file follow its pattern).
"""
