"""Solver files as ``caffe_pb2.SolverParameter`` messages: made, read, changed and written here.

Every solver prototxt ctxpred writes (the checked-in ones under prototxt/ and
those of run folders) is a message built with :func:`make_solver` or read
with :func:`read_solver`, changed with :func:`set_fields` and turned into
text by :func:`solver_text`. The text lists the fields in the order a caller
names (the reference's files are not in field-number order), floats in their
shortest form without a trailing ``.0`` (``1e-05``, ``0``, ``0.999``), so
regenerated files stay byte-identical to the checked-in ones.
"""
import os
from io import StringIO
from pathlib import Path

from google.protobuf import text_format
from google.protobuf.descriptor import FieldDescriptor

from ctxpred.caffe.env import import_caffe

_FLOATS = (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE)


def make_solver(**fields):
    """A new SolverParameter with ``fields`` set (see :func:`set_fields`)."""
    return set_fields(import_caffe().proto.caffe_pb2.SolverParameter(), **fields)


def read_solver(path):
    """The SolverParameter of a solver prototxt; FileNotFoundError / ValueError name the file."""
    from ctxpred.caffe.netparam import read_solver_param
    return read_solver_param(path)


def set_fields(solver, **fields):
    """Set fields of ``solver`` by name and return it; a value None clears the field.

    Enums take their names ("CPU", "GPU"), repeated fields a list; paths are
    written as strings.
    """
    for name, value in fields.items():
        field = solver.DESCRIPTOR.fields_by_name.get(name)
        if field is None:
            raise ValueError(f"a solver has no field {name!r}")
        if value is None:
            solver.ClearField(name)
        elif field.is_repeated:
            solver.ClearField(name)
            getattr(solver, name).extend(value)
        elif field.type == FieldDescriptor.TYPE_ENUM and isinstance(value, str):
            setattr(solver, name, field.enum_type.values_by_name[value].number)
        elif field.type == FieldDescriptor.TYPE_STRING:
            setattr(solver, name, os.fspath(value))
        else:
            setattr(solver, name, value)
    return solver


def _float_text(value, field):
    if field.type == FieldDescriptor.TYPE_FLOAT:
        import numpy as np
        text = str(np.float32(value))  # the shortest text that reads back as this float32
    else:
        text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text


def solver_text(solver, order=(), comments=None):
    """``solver`` as prototxt text: the fields named in ``order`` first, in that order, then
    the others in field-number order; ``comments`` maps a field name to a comment line
    written above it."""
    rank = {name: index for index, name in enumerate(order)}
    fields = sorted(solver.ListFields(),
                    key=lambda item: (rank.get(item[0].name, len(rank)), item[0].number))
    out = StringIO()
    for field, value in fields:
        if comments and field.name in comments:
            out.write(f"# {comments[field.name]}\n")
        values = value if field.is_repeated else [value]
        for item in values:
            if field.type in _FLOATS:
                out.write(f"{field.name}: {_float_text(item, field)}\n")
            else:
                text_format.PrintField(field, item, out)
    return out.getvalue()


def write_solver(solver, path, order=()):
    """Write ``solver`` to ``path`` (see :func:`solver_text`); returns the path."""
    path = Path(path)
    path.write_text(solver_text(solver, order))
    return path


def history_copies(solver):
    """Parameter-sized history blobs the solver's type keeps per parameter (Adam: 2)."""
    return 2 if solver.type in ("Adam", "AdaDelta") else 1
