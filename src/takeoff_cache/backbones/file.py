"""The backbones file (TOML): which ONNX networks a cache needs and how to feed them.

Every entry is checked against its ONNX graph before any work starts, so a
typo in a tensor name fails at validate, not an hour into a build.

A check that passed is remembered in the work folder under a key of the
model's SHA-256, the entry's input and output fields and this tool's
version, with what it read of the graph (the width of its descriptors); the
next build with the same model and entry skips parsing the graph (and
importing onnx and numpy, most of what validating a no-op costs).

A ``matcher`` takes no image: its ``input`` table names its two descriptor
tensors and, where it takes them, their keypoints, and its descriptors must be
as wide as its extractor's (the ``local_features`` backbone's, else SIFT's 128).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from takeoff_cache import __version__
from takeoff_cache.backbones.spec import InputSpec, MatcherInput
from takeoff_cache.core.canonical import content_key
from takeoff_cache.core.documents import MAX_BACKBONES_BYTES, load_toml, read_document
from takeoff_cache.core.fsutil import atomic_write_bytes, kind_problem
from takeoff_cache.errors import BackboneError

if TYPE_CHECKING:
    import onnx

ROLES = ("place_recognition", "local_features", "matcher", "other")
PLACE_RECOGNITION = "place_recognition"
LOCAL_FEATURES = "local_features"
MATCHER = "matcher"
# A local_features network's outputs (docs/backbones.md): name, rank, and the size
# of its last axis where fixed (None: any).
LOCAL_FEATURE_OUTPUTS = (("keypoints", 3, 2), ("scores", 2, None), ("descriptors", 3, None))
_NAME = re.compile(r"[a-z0-9_-]+")
# The keys each table may hold: anything else is a typo that would be silently ignored.
_FILE_KEYS = frozenset({"backbone"})
_ENTRY_KEYS = frozenset({"name", "role", "onnx", "input", "output"})
_INPUT_KEYS = frozenset({"name", "size", "channels", "mean", "std"})
_MATCHER_INPUT_KEYS = frozenset({"descriptors", "keypoints"})
# OpenCV's SIFT, the extractor where no local_features backbone is named, describes
# a keypoint with 128 values: a matcher without a local_features backbone takes those.
SIFT_DESCRIPTOR_WIDTH = 128
# Raised when the graph check learns something new, so that checks remembered
# from before are made again.
_CHECKS_VERSION = 4


def _refuse_unknown(where: str, table: dict[str, Any], known: frozenset[str]) -> None:
    unknown = sorted(set(table) - known)
    if unknown:
        raise BackboneError(
            f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})"
        )


@dataclass(frozen=True)
class Backbone:
    name: str
    role: str
    onnx: Path
    onnx_sha256: str
    input: InputSpec | MatcherInput  # a matcher's is MatcherInput, every other role's an image
    output: str | None
    # Values a keypoint's descriptor has, for local_features and matcher backbones (None
    # where the graph leaves it open): read from the graph, so outside identity().
    descriptor_width: int | None = None

    @property
    def image(self) -> InputSpec:
        """The image input of a backbone that takes images (every role but matcher)."""
        if not isinstance(self.input, InputSpec):
            raise BackboneError(
                f"backbone {self.name!r}: a matcher takes local features, not images"
            )
        return self.input

    def identity(self) -> dict[str, Any]:
        """What of this backbone determines a build's result (paths do not)."""
        return {
            "name": self.name,
            "role": self.role,
            "onnx_sha256": self.onnx_sha256,
            "input": self.input.identity(),
            "output": self.output,
        }


def _dims(value_info: onnx.ValueInfoProto) -> list[int | str]:
    shape = value_info.type.tensor_type.shape
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in shape.dim]


def _number_list(where: str, value: Any, length: int) -> tuple[float, ...]:
    if not (
        isinstance(value, list)
        and len(value) == length
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
    ):
        raise BackboneError(f"{where}: must be a list of {length} numbers")
    return tuple(float(v) for v in value)


def _parse_input(where: str, raw: Any) -> InputSpec:
    if not isinstance(raw, dict):
        raise BackboneError(f"{where}.input: must be a table {{name, size, channels, mean, std}}")
    _refuse_unknown(f"{where}.input", raw, _INPUT_KEYS)
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise BackboneError(f"{where}.input.name: missing")
    size, channels = raw.get("size"), raw.get("channels", 3)
    if not isinstance(size, int) or isinstance(size, bool) or not 8 <= size <= 4096:
        raise BackboneError(f"{where}.input.size: must be an integer in [8, 4096], got {size!r}")
    if not isinstance(channels, int) or isinstance(channels, bool) or channels not in (1, 3):
        raise BackboneError(f"{where}.input.channels: must be 1 or 3, got {channels!r}")
    mean = _number_list(f"{where}.input.mean", raw.get("mean", [0.0] * channels), channels)
    std = _number_list(f"{where}.input.std", raw.get("std", [1.0] * channels), channels)
    if any(s <= 0 for s in std):
        raise BackboneError(f"{where}.input.std: every value must be > 0")
    return InputSpec(name, size, channels, mean, std)


def _name_pair(where: str, value: Any) -> tuple[str, str]:
    if not (
        isinstance(value, list)
        and len(value) == 2
        and all(isinstance(v, str) and v for v in value)
        and value[0] != value[1]
    ):
        raise BackboneError(
            f"{where}: must be two tensor names, the view's then the place's,"
            f' e.g. ["descriptors0", "descriptors1"]; got {value!r}'
        )
    return value[0], value[1]


def _parse_matcher_input(where: str, raw: Any) -> MatcherInput:
    if not isinstance(raw, dict):
        raise BackboneError(
            f"{where}.input: a matcher's input must be a table {{descriptors, keypoints}}"
        )
    _refuse_unknown(f"{where}.input", raw, _MATCHER_INPUT_KEYS)
    if "descriptors" not in raw:
        raise BackboneError(f"{where}.input.descriptors: missing")
    descriptors = _name_pair(f"{where}.input.descriptors", raw["descriptors"])
    keypoints = None
    if "keypoints" in raw:
        keypoints = _name_pair(f"{where}.input.keypoints", raw["keypoints"])
        if set(keypoints) & set(descriptors):
            raise BackboneError(f"{where}.input.keypoints: names a descriptors tensor")
    return MatcherInput(descriptors, keypoints)


def _graph_inputs(graph: onnx.GraphProto) -> dict[str, onnx.ValueInfoProto]:
    """The inputs a caller feeds: those no initializer gives a default."""
    initializers = {i.name for i in graph.initializer}
    return {i.name: i for i in graph.input if i.name not in initializers}


def _check_graph(
    where: str,
    model: onnx.ModelProto,
    spec: InputSpec | MatcherInput,
    role: str,
    output: str | None,
) -> int | None:
    """Check ``model`` against its entry; return its descriptors' width where it has
    fixed descriptors (local_features and matcher), else None."""
    graph = model.graph
    if isinstance(spec, MatcherInput):
        return _check_matcher(where, graph, spec, output)
    inputs = _graph_inputs(graph)
    if spec.name not in inputs:
        raise BackboneError(
            f"{where}.input.name: the ONNX graph has no input {spec.name!r}"
            f" (it has {sorted(inputs)})"
        )
    from onnx import TensorProto

    elem_type = inputs[spec.name].type.tensor_type.elem_type
    if elem_type != TensorProto.FLOAT:
        raise BackboneError(
            f"{where}.input: input {spec.name!r} is {TensorProto.DataType.Name(elem_type)};"
            " the pipeline feeds float32 (FLOAT): export the model with a float32 input"
        )
    dims = _dims(inputs[spec.name])
    if len(dims) != 4:
        raise BackboneError(
            f"{where}.input: input {spec.name!r} has shape {dims}, expected (N, C, H, W)"
        )
    want = [None, spec.channels, spec.size, spec.size]
    for axis in (1, 2, 3):
        if isinstance(dims[axis], int) and dims[axis] != want[axis]:
            raise BackboneError(
                f"{where}.input: input {spec.name!r} has shape {dims},"
                f" which does not match channels={spec.channels}, size={spec.size}"
            )
    if role == PLACE_RECOGNITION:
        outputs = {o.name: o for o in graph.output}
        if output is None:
            raise BackboneError(
                f"{where}.output: a place_recognition backbone must name its output"
            )
        if output not in outputs:
            raise BackboneError(
                f"{where}.output: the ONNX graph has no output {output!r}"
                f" (it has {sorted(outputs)})"
            )
        odims = _dims(outputs[output])
        if len(odims) != 2 or (isinstance(odims[1], int) and odims[1] < 1):
            raise BackboneError(f"{where}.output: {output!r} has shape {odims}, expected (N, D)")
    if role == LOCAL_FEATURES:
        return _check_local_features(where, graph)
    return None


def _check_local_features(where: str, graph: onnx.GraphProto) -> int | None:
    """A local_features graph has outputs keypoints (N, K, 2), scores (N, K) and
    descriptors (N, K, D), K and D fixed or not; return D where it is fixed."""
    outputs = {o.name: o for o in graph.output}
    for name, rank, last in LOCAL_FEATURE_OUTPUTS:
        if name not in outputs:
            raise BackboneError(
                f"{where}.onnx: a local_features network must have outputs keypoints"
                f" (N, K, 2), scores (N, K) and descriptors (N, K, D); it has no output"
                f" {name!r} (it has {sorted(outputs)})"
            )
        dims = _dims(outputs[name])
        if len(dims) != rank or (
            last is not None and isinstance(dims[-1], int) and dims[-1] != last
        ):
            want = {"keypoints": "(N, K, 2)", "scores": "(N, K)", "descriptors": "(N, K, D)"}[name]
            raise BackboneError(f"{where}.onnx: output {name!r} has shape {dims}, expected {want}")
    width = _dims(outputs["descriptors"])[-1]
    return width if isinstance(width, int) and width > 0 else None


def _check_matcher(
    where: str, graph: onnx.GraphProto, spec: MatcherInput, output: str | None
) -> int | None:
    """A matcher graph takes exactly the tensors its entry names, float32: descriptors
    (B, N, D) and (B, M, D), keypoints (B, N, 2) and (B, M, 2) where named, N and M
    dynamic, and outputs scores (B, N, M); return D where it is fixed."""
    from onnx import TensorProto

    inputs = _graph_inputs(graph)
    fields = (
        ("descriptors", spec.descriptors, "(B, N, D)"),
        ("keypoints", spec.keypoints, "(B, N, 2)"),
    )
    for field, names, want in fields:
        for name in names or ():
            if name not in inputs:
                raise BackboneError(
                    f"{where}.input.{field}: the ONNX graph has no input {name!r}"
                    f" (it has {sorted(inputs)})"
                )
            elem_type = inputs[name].type.tensor_type.elem_type
            if elem_type != TensorProto.FLOAT:
                raise BackboneError(
                    f"{where}.input.{field}: input {name!r} is"
                    f" {TensorProto.DataType.Name(elem_type)}; the pipeline feeds float32 (FLOAT)"
                )
            dims = _dims(inputs[name])
            if (
                len(dims) != 3
                or (isinstance(dims[0], int) and dims[0] != 1)  # fed one pair at a time
                or (field == "keypoints" and isinstance(dims[2], int) and dims[2] != 2)
            ):
                raise BackboneError(
                    f"{where}.input.{field}: input {name!r} has shape {dims}, expected {want}"
                )
            if isinstance(dims[1], int):
                raise BackboneError(
                    f"{where}.input.{field}: input {name!r} has shape {dims}: its keypoint"
                    " axis must be dynamic (each view and place has its own count)"
                )
    unfed = sorted(set(inputs) - set(spec.names))
    if unfed:
        raise BackboneError(
            f"{where}.input: the ONNX graph's input {unfed[0]!r} is not named in"
            " input.descriptors or input.keypoints, and a matcher is fed only those"
        )
    widths = sorted({d for n in spec.descriptors if isinstance(d := _dims(inputs[n])[2], int)})
    if len(widths) > 1:
        raise BackboneError(
            f"{where}.input.descriptors: {spec.descriptors[0]!r} and {spec.descriptors[1]!r}"
            f" have different widths ({widths[0]} and {widths[1]})"
        )
    outputs = {o.name: o for o in graph.output}
    if output is None:
        raise BackboneError(
            f"{where}.output: a matcher backbone must name its output, the scores (B, N, M)"
        )
    if output not in outputs:
        raise BackboneError(
            f"{where}.output: the ONNX graph has no output {output!r} (it has {sorted(outputs)})"
        )
    elem_type = outputs[output].type.tensor_type.elem_type
    if elem_type != TensorProto.FLOAT:
        raise BackboneError(
            f"{where}.output: {output!r} is {TensorProto.DataType.Name(elem_type)};"
            " the scores must be float32 (FLOAT)"
        )
    odims = _dims(outputs[output])
    if len(odims) != 3:
        raise BackboneError(f"{where}.output: {output!r} has shape {odims}, expected (B, N, M)")
    return widths[0] if widths and widths[0] > 0 else None


def _check_key(sha256: str, spec: InputSpec | MatcherInput, role: str, output: str | None) -> str:
    return content_key(
        {
            "onnx_sha256": sha256,
            # Only what the graph check reads: mean and std cannot change its verdict.
            "input": spec.identity()
            if isinstance(spec, MatcherInput)
            else [spec.name, spec.size, spec.channels],
            "role": role,
            "output": output,
            "tool_version": __version__,
            "checks": _CHECKS_VERSION,
        }
    )


def _has_external_data(graph: onnx.GraphProto) -> bool:
    """Whether any tensor of ``graph`` or its subgraphs keeps its bytes in another file."""
    from onnx import TensorProto

    tensors = list(graph.initializer)
    subgraphs = []
    for node in graph.node:
        for attr in node.attribute:
            tensors += [attr.t] if attr.HasField("t") else []
            tensors += attr.tensors
            subgraphs += [attr.g] if attr.HasField("g") else []
            subgraphs += attr.graphs
    return any(t.data_location == TensorProto.EXTERNAL for t in tensors) or any(
        _has_external_data(g) for g in subgraphs
    )


def _load_graph(where: str, onnx_path: Path, data: bytes) -> onnx.ModelProto:
    import onnx

    try:
        model = onnx.load_from_string(data)
    except Exception as exc:  # onnx raises DecodeError or RuntimeError depending on version
        raise BackboneError(
            f"{where}.onnx: {onnx_path} is not an ONNX model ({type(exc).__name__})"
        ) from exc
    if len(model.graph.node) == 0:
        raise BackboneError(f"{where}.onnx: {onnx_path} is not an ONNX model (empty graph)")
    # Weights in external files would be outside the model's SHA-256, so outside every
    # engine key and build identity: a changed weight file would reuse a stale engine.
    if _has_external_data(model.graph):
        raise BackboneError(
            f"{where}.onnx: {onnx_path} keeps its weights in external data files, which"
            " are not supported; save the model with its weights inside"
            " (onnx.save_model(model, path, save_as_external_data=False))"
        )
    return model


def _parse_entry(i: int, raw: Any, base: Path, checked: Path | None) -> Backbone:
    if not isinstance(raw, dict):
        raise BackboneError(f"backbone[{i}]: must be a table")
    name = raw.get("name")
    _refuse_unknown(
        f"backbone {name!r}" if isinstance(name, str) else f"backbone[{i}]", raw, _ENTRY_KEYS
    )
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise BackboneError(f"backbone[{i}].name: must match [a-z0-9_-]+, got {name!r}")
    where = f"backbone {name!r}"
    role = raw.get("role")
    if role not in ROLES:
        raise BackboneError(f"{where}.role: must be one of {', '.join(ROLES)}; got {role!r}")
    onnx_field = raw.get("onnx")
    if not isinstance(onnx_field, str) or not onnx_field:
        raise BackboneError(f"{where}.onnx: missing")
    onnx_path = (base / onnx_field).resolve()
    if problem := kind_problem(onnx_path, "file"):
        raise BackboneError(f"{where}.onnx: {onnx_path} {problem}")
    spec: InputSpec | MatcherInput = (
        _parse_matcher_input(where, raw.get("input"))
        if role == MATCHER
        else _parse_input(where, raw.get("input"))
    )
    output = raw.get("output")
    if output is not None and not isinstance(output, str):
        raise BackboneError(f"{where}.output: must be a tensor name")
    data = onnx_path.read_bytes()
    sha256 = hashlib.sha256(data).hexdigest()
    marker = checked / _check_key(sha256, spec, role, output) if checked else None
    remembered = _remembered(marker) if marker is not None else None
    if remembered is None:
        width = _check_graph(where, _load_graph(where, onnx_path, data), spec, role, output)
        if marker is not None:
            try:
                marker.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(marker, json.dumps({"descriptor_width": width}).encode())
            except OSError:
                pass  # a read-only work folder only costs the next build the check
    else:
        (width,) = remembered
    return Backbone(name, role, onnx_path, sha256, spec, output, width)


def _remembered(marker: Path) -> tuple[int | None] | None:
    """What a passed check recorded in ``marker`` (the descriptor width); None where
    nothing readable is recorded: the graph is checked again."""
    try:
        width = json.loads(marker.read_bytes())["descriptor_width"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if width is not None and not (isinstance(width, int) and width > 0):
        return None
    return (width,)


def _with_matcher_width(backbones: tuple[Backbone, ...]) -> tuple[Backbone, ...]:
    """Check that the matcher (at most one) takes its extractor's descriptors, and give
    it their width where its own graph leaves it open."""
    matchers = [b for b in backbones if b.role == MATCHER]
    if not matchers:
        return backbones
    if len(matchers) > 1:
        raise BackboneError(
            f"backbones: at most one matcher backbone is allowed,"
            f" found {len(matchers)} ({', '.join(b.name for b in matchers)})"
        )
    found = matchers[0]
    extractors = [b for b in backbones if b.role == LOCAL_FEATURES]
    if extractors:
        width, source = extractors[0].descriptor_width, f"its extractor {extractors[0].name!r}"
    else:
        width, source = SIFT_DESCRIPTOR_WIDTH, "its extractor, OpenCV's SIFT (no local_features)"
    if found.descriptor_width is None:
        return tuple(
            dataclasses.replace(b, descriptor_width=width) if b is found else b for b in backbones
        )
    if width is not None and width != found.descriptor_width:
        raise BackboneError(
            f"backbone {found.name!r}.input.descriptors: the matcher takes descriptors of"
            f" {found.descriptor_width} values, but {source} gives {width}"
        )
    return backbones


def load_backbones(path: Path, checked: Path | None = None) -> tuple[Backbone, ...]:
    """Parse and check a backbones file; exactly one place-recognition backbone is required.

    ``checked``: the work folder's record of graphs that passed (module docstring).
    """
    data = read_document(path, MAX_BACKBONES_BYTES, BackboneError, "backbones")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BackboneError(f"backbones: {path} is not valid TOML: {exc}") from None
    doc = load_toml(text, str(path), BackboneError, "backbones")
    entries = doc.get("backbone")
    if not isinstance(entries, list) or not entries:
        raise BackboneError(f"backbones: {path} has no [[backbone]] entries")
    _refuse_unknown(f"backbones: {path}", doc, _FILE_KEYS)
    # Count roles before opening any model: "two place_recognition backbones" is
    # the error to report, not whatever the second one's graph lacks.
    named = [
        str(raw.get("name"))
        for raw in entries
        if isinstance(raw, dict) and raw.get("role") == PLACE_RECOGNITION
    ]
    if len(named) > 1:
        raise BackboneError(
            f"backbones: exactly one place_recognition backbone is required,"
            f" found {len(named)} ({', '.join(named)})"
        )
    backbones = tuple(_parse_entry(i, raw, path.parent, checked) for i, raw in enumerate(entries))
    names = [b.name for b in backbones]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise BackboneError(f"backbones: name {dup[0]!r} is used twice")
    backbones = _with_matcher_width(backbones)
    vpr = [b.name for b in backbones if b.role == PLACE_RECOGNITION]
    if len(vpr) != 1:
        raise BackboneError(
            f"backbones: exactly one place_recognition backbone is required, found {len(vpr)}"
            + (f" ({', '.join(vpr)})" if vpr else "")
        )
    return backbones


def place_recognition(backbones: tuple[Backbone, ...]) -> Backbone:
    return next(b for b in backbones if b.role == PLACE_RECOGNITION)


def matcher(backbones: tuple[Backbone, ...]) -> Backbone | None:
    """The matcher backbone, where the file names one (at most one is allowed)."""
    return next((b for b in backbones if b.role == MATCHER), None)
