"""Running a Caffe solver: the training loop with clean stops and resume
(``loop``), train.log and its plot (``log``), atomic snapshots and the
run-folder lock (``snapshots``)."""
