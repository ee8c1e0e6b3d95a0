"""Net definitions as caffe_pb2 messages: reading, upgrading, phase filtering, building.

Every module that needs a NetParameter or a pycaffe Net of one goes through
here, so that a prototxt is checked once, the same way, before Caffe sees
it (Caffe aborts the whole process on a bad one):

- :func:`read_net_param` / :func:`read_solver_param`: a prototxt file as a
  message, with one-line errors naming the file, layer or blob at fault;
  the 2015 ``input:`` header becomes an Input layer
  (:func:`upgrade_input_header`).
- :func:`phase_layers`: the layers Caffe keeps for a phase, level and stages
  (its NetStateRule semantics).
- :func:`truncated`: the net up to the layer that writes a blob.
- :func:`instantiate`: a pycaffe Net of a message (Caffe reads nets only
  from files).
- :func:`weight_shapes_of`: parameter shapes of a net Caffe may not be able
  to build, checked in a child process.
"""
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from google.protobuf import text_format
from google.protobuf.message import Message

from ctxpred.caffe.env import import_caffe, load_caffe

PHASES = ("train", "test")


def read_prototxt(path, message, what):
    """Parse the text-format protobuf file ``path`` into ``message``, naming the file on error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        text_format.Merge(path.read_text(encoding="utf-8"), message)
    except (text_format.ParseError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not a Caffe {what} (prototxt): {error}") from None
    return message


def read_net_param(path):
    """The caffe_pb2.NetParameter of a prototxt file (protobuf text format).

    A legacy ``input:`` header (as in the 2015 released deploy nets) becomes
    an Input layer. Raises FileNotFoundError naming a missing file, and
    ValueError naming a file that is not a net definition (not text, a syntax
    error, no layers, or the V1 ``layers`` format that Caffe upgrades on load)
    and the first layer whose type this Caffe build lacks or that reads a blob
    no earlier layer writes (building it would abort the process).
    """
    path = Path(path)
    net_param = read_prototxt(path, import_caffe().proto.caffe_pb2.NetParameter(),
                              "net definition")
    if net_param.layers:
        raise ValueError(f"{path} uses Caffe's V1 'layers' format; convert it with Caffe's "
                         "upgrade_net_proto_text")
    upgrade_input_header(net_param)
    if not net_param.layer:
        raise ValueError(f"{path} defines no layers")
    known, written = set(import_caffe().layer_type_list()), set()
    for layer in net_param.layer:
        if layer.type not in known:
            raise ValueError(f"{path}: layer {layer.name!r} has type {layer.type!r}, which this "
                             f"Caffe build does not have")
        for bottom in layer.bottom:
            if bottom not in written:
                raise ValueError(f"{path}: layer {layer.name!r} reads blob {bottom!r}, which no "
                                 "earlier layer writes")
        written.update(layer.top)
    return net_param


def read_solver_param(path):
    """The caffe_pb2.SolverParameter of a solver prototxt, checked before Caffe reads it.

    Raises FileNotFoundError naming a missing file and ValueError naming one
    that is not a solver definition (Caffe would abort the process on it).
    """
    return read_prototxt(path, import_caffe().proto.caffe_pb2.SolverParameter(),
                         "solver definition")


def upgrade_input_header(net_param):
    """Replace ``input:`` / ``input_shape`` / ``input_dim`` by Input layers, in place.

    Raises ValueError when the header's names and shapes do not pair up.
    """
    if not net_param.input:
        return net_param
    names = list(net_param.input)
    if net_param.input_shape:
        shapes = [list(shape.dim) for shape in net_param.input_shape]
    else:
        dims = list(net_param.input_dim)
        shapes = [dims[4 * i:4 * i + 4] for i in range(len(dims) // 4)]
    if len(shapes) != len(names):
        raise ValueError(f"the net declares {len(names)} inputs but {len(shapes)} input shapes")
    caffe_pb2 = import_caffe().proto.caffe_pb2
    inputs = []
    for name, dims in zip(names, shapes):
        layer = caffe_pb2.LayerParameter(name=name, type="Input", top=[name])
        layer.input_param.shape.add(dim=dims)
        inputs.append(layer)
    layers = inputs + list(net_param.layer)
    for field in ("input", "input_shape", "input_dim", "layer"):
        net_param.ClearField(field)
    net_param.layer.extend(layers)
    return net_param


def _meets(rule, phase, state):
    return not ((rule.HasField("phase") and rule.phase != phase)
                or (rule.HasField("min_level") and state.level < rule.min_level)
                or (rule.HasField("max_level") and state.level > rule.max_level)
                or any(stage not in state.stage for stage in rule.stage)
                or any(stage in state.stage for stage in rule.not_stage))


def phase_layers(net_param, phase):
    """The LayerParameters Caffe builds for ``phase`` ("train" or "test").

    Caffe's NetStateRule check: a layer with ``include`` rules is kept when
    one of them is met, otherwise it is dropped when an ``exclude`` rule is
    met; a rule is met when its phase, level range and stages all match the
    net's state (``net_param.state``'s level and stages).
    """
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r} (one of {', '.join(PHASES)})")
    number = PHASES.index(phase)  # caffe_pb2.TRAIN == 0, TEST == 1
    state = net_param.state
    return [layer for layer in net_param.layer
            if (any(_meets(rule, number, state) for rule in layer.include) if layer.include
                else not any(_meets(rule, number, state) for rule in layer.exclude))]


def python_layer_params(layer_type, param_str, required=None):
    """A Python layer's ``param_str`` as a dict (JSON object; empty means ``{}``).

    Raises ValueError naming ``layer_type`` and the text for invalid JSON,
    a value that is not an object, or a missing or empty ``required`` key.
    """
    try:
        params = json.loads(param_str or "{}")
    except json.JSONDecodeError as error:
        raise ValueError(f"{layer_type} param_str is not valid JSON ({error}): "
                         f"{param_str!r}") from None
    if not isinstance(params, dict):
        raise ValueError(f"{layer_type} param_str must be a JSON object, got {param_str!r}")
    if required is not None and not params.get(required):
        raise ValueError(f"{layer_type} param_str needs a \"{required}\": {param_str!r}")
    return params


def truncated(net_param, blob):
    """Copy of ``net_param`` keeping the layers up to the last one that writes ``blob``.

    In-place layers on ``blob`` (a ReLU after conv5, say) are kept, so the
    blob holds what it holds after the full net's forward pass. Raises
    ValueError listing the net's blobs when none is called ``blob``.
    """
    writers = [index for index, layer in enumerate(net_param.layer) if blob in layer.top]
    if not writers:
        blobs = list(dict.fromkeys(top for layer in net_param.layer for top in layer.top))
        raise ValueError(f"the net has no blob {blob!r}; its blobs: {', '.join(blobs)}")
    cut = type(net_param)()
    cut.CopyFrom(net_param)
    del cut.layer[writers[-1] + 1:]
    return cut


def instantiate(net_param, phase="test", weights=None):
    """A pycaffe Net of NetParameter ``net_param`` in ``phase`` ("train" or "test").

    Parameters come from the fillers, or from the caffemodel ``weights``
    (copied by layer name, as ``caffe.Net(prototxt, weights, phase)`` does).
    """
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r} (one of {', '.join(PHASES)})")
    caffe = import_caffe()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "net.prototxt")
        with open(path, "w", encoding="utf-8") as file:
            file.write(str(net_param))
        mode = caffe.TRAIN if phase == "train" else caffe.TEST
        if weights is None:
            return caffe.Net(path, mode)
        return caffe.Net(path, str(weights), mode)


def weight_shapes(net):
    """{layer: [blob shape tuples]} of a pycaffe Net's weights (its parameter blobs)."""
    return {name: [blob.data.shape for blob in blobs] for name, blobs in net.params.items()}


def _without_fillers(net_param):
    copy = type(net_param)()
    copy.CopyFrom(net_param)
    for layer in copy.layer:
        for _, value in layer.ListFields():
            if isinstance(value, Message):  # a layer's *_param
                for name in ("weight_filler", "bias_filler"):
                    if name in value.DESCRIPTOR.fields_by_name:
                        value.ClearField(name)
    return copy


def weight_shapes_of(net_param, source=None):
    """{layer: [blob shape tuples]} of the weights of the net NetParameter ``net_param`` defines.

    Caffe builds the net in a child process, in the TEST phase (layers
    restricted to TRAIN are not seen) on the CPU, with every weight / bias
    filler cleared so that the blobs are zeros and even VGG16 builds in about
    a second. A net Caffe cannot build (an unknown layer type, a data layer
    whose source is missing, impossible geometry) would abort the process
    that builds it; here it raises ValueError naming the net and quoting
    Caffe's reason (and ``source``, the prototxt's file name, when given).
    Relative paths in data layers resolve from the current folder; a
    PatchPairData layer needs its source.
    """
    package_root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, GLOG_minloglevel="2",
               PYTHONPATH=os.pathsep.join(filter(None, [package_root,
                                                        os.environ.get("PYTHONPATH")])))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder, "net.prototxt")
        path.write_text(str(_without_fillers(net_param)), encoding="utf-8")
        child = subprocess.run(
            [sys.executable, "-c", "import sys; from ctxpred.caffe.netparam import "
             "_print_param_shapes; _print_param_shapes(sys.argv[1])", str(path)],
            capture_output=True, text=True, env=env)
    if child.returncode != 0 or not child.stdout.strip():
        what = source or f"the net {net_param.name!r}"
        raise ValueError(f"Caffe cannot build {what}: {_caffe_failure(child.stderr)}")
    shapes = json.loads(child.stdout.strip().splitlines()[-1])
    return {name: [tuple(shape) for shape in blobs] for name, blobs in shapes.items()}


def _print_param_shapes(prototxt):
    """Child process of :func:`weight_shapes_of`: build the net, print its shapes as JSON."""
    caffe = load_caffe()
    from ctxpred.data.layer import close_data_layers  # imports pycaffe's Layer at module level
    net = caffe.Net(prototxt, caffe.TEST)
    close_data_layers(net)
    print(json.dumps(weight_shapes(net)))


_GLOG_FATAL = re.compile(r"F\d+ \S+ +\d+ \S+\] (.*)")  # glog: F<date> <time> <tid> <file>] msg


def _caffe_failure(stderr):
    """Why a Caffe process failed: glog's fatal message, else the last line (Python's error)."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    fatal = [match.group(1) for match in map(_GLOG_FATAL.match, lines) if match]
    reason = fatal[0] if fatal else lines[-1] if lines else "no message"
    return reason if len(reason) <= 300 else reason[:300] + "..."
