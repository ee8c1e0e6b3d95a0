"""VOC07 classification fine-tuning (Kraehenbuehl et al. 2016): the labelled
images and the ``VocClassificationData`` Caffe layer (``data``) and a run with
its mAP (``run``)."""


def __getattr__(name):
    """Keep ``module: "ctxpred.classification"`` in existing prototxt working."""
    if name == "VocClassificationData":
        from ctxpred.classification.data import VocClassificationData
        return VocClassificationData
    raise AttributeError(name)
