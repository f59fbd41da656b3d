"""The per-layer report: sections built during a run, tables of them, and the saved file.

``sections`` holds what the modifiers attach to the model, ``tables`` prints
them, ``saved`` reads a written ``tamp_report.json`` back (and ``reallocate``
gives new ratios from it). Writing the file is deployment's job
(``tamp_modifier.deploy.report_writer``), done when the model is saved.
"""
