"""Reports: `build` (a run's or a checkpoint's layers, summary, history and rounds as data),
`render` (table, JSON, CSV, markdown) and `check` (does a file follow its pattern).
"""
