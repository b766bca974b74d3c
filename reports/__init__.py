"""Reports from a results directory alone: paper-style tables of a run (:mod:`reports.tables`), the experiment pages
of ``equi report --all`` (:mod:`reports.experiment_pages`) and their PNG figures (:mod:`reports.figures`)."""
