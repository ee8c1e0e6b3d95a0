"""Old module path of ``PatchPairData``, kept for existing prototxt files."""
from ctxpred.data.layer import PatchPairData  # noqa: F401
