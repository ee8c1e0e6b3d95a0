"""Running a Caffe solver, one loop for every kind of run: ``loop`` (run_solver:
clean stops, resume, divergence watch, progress; used by context training,
the detector and the classifier), ``log`` (train.log and its plot),
``snapshots`` (atomic snapshots, verified resume, the run-folder lock),
``solvers`` (solver files as SolverParameter messages), ``context_run``
(context-prediction runs), ``commands`` and ``demo`` (tools/train.py's and
tools/demo.py's work)."""
